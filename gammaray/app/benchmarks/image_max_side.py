"""`gammaray bench image-max-side`: what `prepare --image-max-side PX` buys the training stream.

For 1600x1067 product-photo JPEGs (quality 85) and each PX: the bytes stored per image, the one-off
CPU cost in prepare (decode + shrink + JPEG encode, per image) and the stream's CPU cost per image at
`--image-size` (the stream's own decode with its JPEG draft scale + resize: `pipelines/images.decode`
and `pipelines/preprocess.resize_view`, as `preprocess_batch` calls them with augmented views on).
The rounds interleave the settings so that load from other programs hits them alike; the median
round is reported, as CPU time of this process (one thread).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
from PIL import Image


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sides", default="none,512,448,336", help="comma-separated PX values; none = originals")
    p.add_argument("--image-size", type=int, default=224, help="the stream's image size (default 224)")
    p.add_argument("--images", type=int, default=8, help="distinct photos (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")


def photos(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (133, 200, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((1600, 1067), Image.BICUBIC).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _cpu_ms_per_image(fn, items: list) -> float:
    t0 = time.process_time()
    for x in items:
        fn(x)
    return (time.process_time() - t0) * 1000 / len(items)


def run(args: argparse.Namespace) -> int:
    from pipelines.images import decode, resized_for_training
    from pipelines.preprocess import resize_view

    originals = photos(args.images)
    sides = [None if s.strip().lower() == "none" else int(s) for s in args.sides.split(",")]
    draft = (args.image_size * 2, args.image_size * 2)  # preprocess._draft_size with augmented views
    stored = {px: [resized_for_training(b, px, 10**8)[0] if px else b for b in originals] for px in sides}

    def stream(b: bytes) -> None:
        resize_view(decode(b, 10**8, draft)[0], args.image_size)

    prep: dict = {px: [] for px in sides}
    cost: dict = {px: [] for px in sides}
    for r in range(args.rounds):
        for px in (sides if r % 2 == 0 else sides[::-1]):
            if px:
                prep[px].append(_cpu_ms_per_image(lambda b: resized_for_training(b, px, 10**8), originals))
            cost[px].append(_cpu_ms_per_image(stream, stored[px]))
    base = statistics.median(cost[None]) if None in cost else None
    cols = ["stored as", "KB per image", "prepare ms per image", f"stream ms per image at {args.image_size}",
            "stream speed-up"]
    rows = []
    for px in sides:
        size = Image.open(io.BytesIO(stored[px][0])).size
        c = statistics.median(cost[px])
        rows.append([f"original {size[0]}x{size[1]}" if px is None else f"--image-max-side {px} ({size[0]}x{size[1]})",
                     f"{np.mean([len(b) for b in stored[px]]) / 1024:.0f}",
                     "-" if px is None else f"{statistics.median(prep[px]):.1f}", f"{c:.2f}",
                     f"{base / c:.2f}x" if base else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    for r in [cols, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"provenance": "measured by this command on a shared, loaded 2-core machine",
                       "command": f"gammaray bench image-max-side --sides {args.sides} --image-size {args.image_size}",
                       "setting": f"{args.images} synthetic 1600x1067 JPEG photos (quality 85), CPU ms per image on "
                                  f"one thread, median of {args.rounds} interleaved rounds",
                       "columns": cols, "rows": rows}, f, indent=1)
    return 0
