from __future__ import annotations

import argparse
import json
from dataclasses import asdict



def run(args: argparse.Namespace) -> int:
    from workers.evaluation.embed import EmbedOptions, embed_catalogue

    use_gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    config = None
    if args.checkpoint is None:
        if not args.features:
            raise ValueError("embed: --checkpoint is required (without one, --features --config names the towers)")
        from gammaray.config import load

        config = load(args.config, args.overrides)
    elif args.config:
        raise ValueError("embed: --config is for --features without --checkpoint (the checkpoint has its config)")
    res = embed_catalogue(args.checkpoint, args.data, args.out,
                          EmbedOptions(batch_size=args.batch_size, actors=args.actors, use_gpu=use_gpu,
                                       cpus_per_actor=args.cpus_per_actor, progress=not args.quiet),
                          cfg_overrides=args.overrides if args.checkpoint else None, features=args.features,
                          config=config)
    print(res.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(res), f, indent=2)
    return 0


def register(sub) -> None:
    import workers.evaluation.embed

    p = sub.add_parser("embed", help="embed a whole prepared catalogue with Ray Data (actor pool, GPU when present)",
                       description=workers.evaluation.embed.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="URI", help="checkpoint, model/ or run folder (local or s3://)")
    p.add_argument("--features", action="store_true",
                   help="write the towers' pooled features (image_features, text_features) instead of the heads' "
                        "embeddings: the cache that data.features.* trains heads on")
    p.add_argument("--config", metavar="PATH", help="with --features and no --checkpoint: the config whose "
                                                      "model.image/text towers make the features")
    p.add_argument("--data", required=True, metavar="URI", help="a prepared catalogue (gammaray prepare)")
    p.add_argument("--out", required=True, metavar="URI", help="output folder (local or s3://); reruns resume")
    p.add_argument("--batch-size", type=int, default=64, help="records per model forward (default 64)")
    p.add_argument("--actors", type=int, default=1, help="model replicas in the actor pool (default 1)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="logical CPUs per actor (default 1)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                   help="one GPU per actor: auto = when the Ray cluster has GPUs")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", metavar="PATH=VALUE", action="append", default=[],
                   help="override a value of the checkpoint's config by dotted path (repeatable), e.g. "
                        "eval.prompt_template='a photo of {}' or storage.endpoint_url=...")
    p.set_defaults(func=run)
