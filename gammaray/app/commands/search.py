from __future__ import annotations

import argparse
import json
import sys


def run(args: argparse.Namespace) -> int:
    from workers.evaluation.export import storage_from_overrides
    from workers.evaluation.index import OpenIndex
    from workers.evaluation.query import QueryEncoder

    if args.text is None and args.image is None:
        raise ValueError("search: give --text, --image or both")
    storage_cfg = storage_from_overrides(args.overrides)
    index = OpenIndex(args.index, storage_cfg)
    checkpoint = args.checkpoint or index.meta["checkpoint"]
    encoder = QueryEncoder(checkpoint, storage_cfg)
    index.check_model(encoder.fingerprint, f"({checkpoint})")
    image = None
    if args.image is not None:
        with open(args.image, "rb") as f:
            image = f.read()
    hits = index.search(encoder.encode_query(args.text, image), args.k)[0]
    if args.json:
        json.dump({"index": args.index, "column": index.meta["column"], "query": {"text": args.text, "image": args.image},
                   "hits": [vars(h) for h in hits]}, sys.stdout)
        print()
        return 0
    width = max([len("product_id")] + [len(h.product_id) for h in hits])
    print(f"{'#':>3}  {'product_id':<{width}}  {'score':>6}  title")
    for h in hits:
        print(f"{h.rank:>3}  {h.product_id:<{width}}  {h.score:6.3f}  {h.title or ''}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("search", help="the top products of an index for a text and/or image query",
                       description="Embeds the query with the checkpoint's towers and the preprocessing of "
                                   "training, then looks it up in an index built by gammaray index. The index "
                                   "remembers the model its embeddings came from: another model is refused.")
    p.add_argument("--index", required=True, metavar="URI", help="an index folder (gammaray index --out)")
    p.add_argument("--text", help="a text query, e.g. 'red leather boots'")
    p.add_argument("--image", metavar="PATH", help="an image file as query (with --text too: their mean)")
    p.add_argument("-k", type=int, default=10, help="how many products (default 10)")
    p.add_argument("--checkpoint", metavar="URI", help="the query model (default: the one the index was built with)")
    p.add_argument("--json", action="store_true", help="print the hits as one JSON object")
    p.add_argument("--set", dest="overrides", metavar="PATH=VALUE", action="append", default=[],
                   help="storage settings, e.g. storage.endpoint_url=...")
    p.set_defaults(func=run)
