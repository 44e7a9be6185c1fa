from __future__ import annotations

import argparse
import json
import re
import sys

from gammaray.config import ConfigError

from . import add_config_args, config_from_args


def parse_size(text: str) -> int:
    """'128MB', '64 MiB', '1G', '5000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128MB, 1GiB, 500000)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def run(args: argparse.Namespace) -> int:
    from pipelines.prepare import PrepareError, PrepareOptions, prepare
    from pipelines.storage import Store
    from pipelines.tokenizer import build_for_catalogue

    cfg = config_from_args(args)
    store = Store.of(cfg.storage)
    column_map = {}
    for item in args.map:
        if "=" not in item:
            raise ConfigError(f"--map {item!r} must look like field=column")
        k, v = item.split("=", 1)
        column_map[k.strip()] = v.strip()
    opts = PrepareOptions(column_map=column_map, max_records_per_shard=args.records_per_shard,
                          target_shard_bytes=args.shard_size, row_group_size=args.row_group_size,
                          max_image_pixels=cfg.data.max_image_pixels, max_text_chars=cfg.data.max_text_chars,
                          max_image_bytes=args.max_image_bytes or cfg.data.max_image_bytes,
                          allow_outside_paths=args.allow_outside_paths or cfg.data.allow_outside_paths,
                          csv_field_limit=args.csv_field_limit,
                          max_record_bytes=args.max_record_bytes or cfg.data.max_record_bytes,
                          image_max_side=args.image_max_side,
                          check_images=not args.no_image_check, io_threads=args.io_threads, progress=not args.quiet,
                          cpus=args.cpus, address=args.address or cfg.ray.address)
    try:
        res = prepare(args.src, args.dst, opts, store)
    except PrepareError as err:
        print(f"gammaray prepare: error: {err}", file=sys.stderr)
        return 1
    print(res.summary())
    if args.build_tokenizer:
        uri = args.tokenizer_out or args.dst.rstrip("/").rsplit("/", 1)[0] + "/tokenizer"
        build_for_catalogue(args.dst, uri, res.manifest, vocab_size=args.build_tokenizer, storage_cfg=store,
                            sample=args.tokenizer_sample or cfg.data.tokenizer_sample, seed=cfg.run.seed)
        print(f"tokenizer -> {uri}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_json(), f, indent=2)
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="raw catalogue (JSONL/CSV/Parquet/WebDataset + images) -> validated Parquet shards",
                       description="Validate a raw catalogue (JSONL, CSV, Parquet or WebDataset .tar shards in "
                                   "img2dataset's layout; a file or a folder; local, file://, s3:// or any fsspec URL), "
                                   "assign a dense sample_index, write Parquet shards, a manifest and a quarantine of "
                                   "rejected records. Idempotent and append-safe.")
    p.add_argument("src", help="source file or folder (local path, file://, s3://, any fsspec URL)")
    p.add_argument("dst", help="destination catalogue folder (local path, file://, s3://)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="take record field FIELD from source column COLUMN (repeatable), e.g. --map title=name")
    p.add_argument("--shard-size", type=parse_size, default=128 * 2**20, metavar="SIZE",
                   help="target shard size, e.g. 128MB (default 128MiB)")
    p.add_argument("--records-per-shard", type=int, default=1000, help="at most this many records per shard (default 1000)")
    p.add_argument("--row-group-size", type=int, default=128,
                   help="rows per row group: the shuffle unit and one Ray Data task (default 128)")
    p.add_argument("--no-image-check", action="store_true",
                   help="skip the full decode of every image (bad images are then quarantined while streaming)")
    p.add_argument("--image-max-side", type=int, metavar="PX",
                   help="store each image shrunk to PX pixels on its longer side (decoded, converted as the stream "
                        "would, RGB JPEG); smaller images are stored as they are; the source is never changed")
    p.add_argument("--io-threads", type=int, default=8, help="threads fetching and checking images (default 8)")
    p.add_argument("--cpus", type=int, metavar="N",
                   help="Ray tasks reading, validating and writing at once (default: every CPU of this machine, or of "
                        "the cluster); 1 prepares in this process, as does a source under 2 MiB")
    p.add_argument("--address", metavar="ADDR",
                   help="the Ray cluster to prepare on (default: ray.address, $RAY_ADDRESS, else a local instance)")
    p.add_argument("--max-image-bytes", type=parse_size, metavar="SIZE",
                   help="larger image files are quarantined before they are read (default: data.max_image_bytes, 64MiB)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="read local image paths outside the source folder (.., absolute paths, symlinks leaving it); "
                        "only for a trusted catalogue (data.allow_outside_paths)")
    p.add_argument("--csv-field-limit", type=int, default=131_072, metavar="CHARS",
                   help="a CSV row with a longer field is quarantined as field_too_large (default 131072)")
    p.add_argument("--max-record-bytes", type=parse_size, metavar="SIZE",
                   help="a longer JSONL/CSV line is quarantined as oversized_record without being held in memory "
                        "(default: data.max_record_bytes, 16MiB)")
    p.add_argument("--build-tokenizer", type=int, metavar="VOCAB",
                   help="also train a WordPiece tokenizer of this size")
    p.add_argument("--tokenizer-sample", type=int, metavar="N",
                   help="train the tokenizer on a seeded sample of about N texts (default: data.tokenizer_sample)")
    p.add_argument("--tokenizer-out", metavar="URL", help="where to write it (default: DST/../tokenizer)")
    p.add_argument("--json", metavar="PATH", help="write the counts as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p)
    p.set_defaults(func=run)
