from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from workers.evaluation.export import storage_from_overrides
    from workers.evaluation.index import build_index

    parallel = {"auto": None, "yes": True, "no": False}[args.parallel]
    res = build_index(args.embeddings, args.out, field_name=args.field, storage_cfg=storage_from_overrides(args.overrides),
                      flat_max=args.flat_max, parallel=parallel)
    print(res.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in vars(res).items()}, f, indent=2)
    return 0


def register(sub) -> None:
    import workers.evaluation.index

    p = sub.add_parser("index", help="build a FAISS index over an embedded catalogue (gammaray embed's output)",
                       description=workers.evaluation.index.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, metavar="URI", help="the --out folder of gammaray embed (local or s3://)")
    p.add_argument("--out", metavar="URI", help="where the index goes (default EMBEDDINGS/index-FIELD)")
    p.add_argument("--field", default="image",
                   help="which embedding column to index: image (default: text queries find products by their "
                        "images, the cross-modal match the encoder is trained for), text, or another output name")
    p.add_argument("--flat-max", type=int, default=workers.evaluation.index.FLAT_MAX,
                   help="up to this many vectors the index is exact (flat); above it IVF-PQ (default %(default)s)")
    p.add_argument("--parallel", choices=["auto", "yes", "no"], default="auto",
                   help="add the shards in Ray tasks (auto: for IVF-PQ over more than one shard)")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--set", dest="overrides", metavar="PATH=VALUE", action="append", default=[],
                   help="storage settings, e.g. storage.endpoint_url=...")
    p.set_defaults(func=run)
