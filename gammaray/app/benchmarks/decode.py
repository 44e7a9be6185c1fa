"""`gammaray bench decode`: what the one decode path (pipelines/images.decode) costs and changes.

1. Per kind of image (pipelines/image_kinds.py, and the demo's synthetic JPEGs and a 1600x1067 photo
   decoded at JPEG draft scale for a 64 px model): CPU time per image of `decode` against a plain
   `Image.open` + `draft` + `convert("RGB")` (what the decoder did before it handled transparency,
   bit depth, colour profiles and orientation), median over --rounds interleaved rounds, this
   process's CPU time (wall time on a shared machine says little).
2. With --images DIR: a real image collection (e.g. openclipart's PNGs): how many images each
   conversion touches, and for the transparent ones the colour a plain convert("RGB") shows where
   alpha is 0 and how far the pixels move (mean absolute difference, 0..255).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
import warnings
from collections import Counter

import numpy as np
from PIL import Image

from gammaray.app.benchmarks.common import markdown_table
from pipelines import image_kinds
from pipelines.images import decode

MAX_PIXELS = 25_000_000


def plain(data: bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", draft)
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def _kinds() -> dict[str, tuple[list[bytes], tuple[int, int] | None]]:
    from pipelines.synthetic import encode_jpeg, render_image, sample_products

    rng = np.random.default_rng(0)
    photo = []
    for i in range(8):
        small = np.random.default_rng(i).integers(0, 255, (133, 200, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((1600, 1067), Image.BICUBIC).save(buf, "JPEG", quality=85)
        photo.append(buf.getvalue())
    return {
        "synthetic JPEG 96 px (the demo)": ([encode_jpeg(render_image(p, rng, 96)) for p in sample_products(64, 0)], None),
        "photo JPEG 1600x1067, draft 64": (photo, (64, 64)),
        "RGBA cut-out PNG 256 px": ([image_kinds.rgba_cutout(scale=16)] * 32, None),
        "palette + tRNS PNG 256 px": ([image_kinds.palette_trns(scale=16)] * 32, None),
        "16-bit greyscale PNG 256 px": ([image_kinds.gradient_16bit(rows=256)] * 32, None),
        "CMYK JPEG 256 px": ([image_kinds.cmyk_jpeg(scale=16)] * 32, None),
        "ICC-tagged (Adobe RGB) PNG 256 px": ([image_kinds.icc_tagged_png((100, 180, 90), side=256)] * 32, None),
        "EXIF-rotated JPEG 512x256": ([image_kinds.exif_rotated_jpeg(scale=16)[0]] * 32, None),
    }


def cost_per_kind(rounds: int) -> list[dict]:
    out = []
    for name, (images, draft) in _kinds().items():
        times: dict[str, list[float]] = {"plain": [], "decode": []}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plain() on a palette+tRNS image warns once per image
            for _ in range(rounds):
                for label, fn in (("plain", lambda d: plain(d, draft)), ("decode", lambda d: decode(d, MAX_PIXELS, draft))):
                    t0 = time.process_time()
                    for data in images:
                        fn(data)
                    times[label].append((time.process_time() - t0) / len(images) * 1e3)
        p, d = statistics.median(times["plain"]), statistics.median(times["decode"])
        out.append({"kind": name, "plain_ms": round(p, 4), "decode_ms": round(d, 4), "decode_vs_plain": round(d / p, 3),
                    "conversions": list(decode(images[0], MAX_PIXELS, draft)[1])})
    return out


def scan(folder: str, limit: int) -> dict:
    paths = []
    for root, _, names in sorted(os.walk(folder)):
        paths += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))]
    paths = paths[:limit]
    conversions: Counter = Counter()
    hidden: Counter = Counter()
    moved, bad = [], Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            with open(path, "rb") as f:
                data = f.read()
            try:
                img, done = decode(data, MAX_PIXELS, (256, 256))
            except Exception as err:  # noqa: BLE001 - counted: what prepare would quarantine
                bad[getattr(err, "reason", type(err).__name__)] += 1
                continue
            conversions.update(done)
            if "transparency" in done:
                before = np.asarray(plain(data, (256, 256))).astype(np.int16)
                alpha = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))[..., 3]
                if (alpha == 0).any() and before.shape[:2] == alpha.shape:
                    hidden[str(tuple(int(v) for v in np.median(before[alpha == 0], axis=0)))] += 1
                if before.shape == np.asarray(img).shape:
                    moved.append(float(np.abs(np.asarray(img).astype(np.int16) - before).mean()))
    return {"folder": folder, "images": len(paths), "conversions": dict(conversions.most_common()),
            "rejected": dict(bad), "plain_colour_under_alpha_0": dict(hidden.most_common(5)),
            "transparent_mean_abs_change_median": round(statistics.median(moved), 1) if moved else None}


def format_table(costs: list[dict]) -> str:
    return markdown_table(["image", "plain convert ms", "decode ms", "decode / plain", "conversions"],
                          [[c["kind"], f"{c['plain_ms']:.3f}", f"{c['decode_ms']:.3f}", f"{c['decode_vs_plain']:.2f}",
                            ", ".join(c["conversions"]) or "-"] for c in costs])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per kind; the median is reported (default 5)")
    p.add_argument("--images", metavar="DIR", help="also scan the image files under DIR (e.g. openclipart's PNGs)")
    p.add_argument("--limit", type=int, default=2000, help="at most this many images from --images (default 2000)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    result: dict = {"cpu_ms_per_image": cost_per_kind(max(1, args.rounds))}
    print(format_table(result["cpu_ms_per_image"]))
    if args.images:
        result["scan"] = scan(os.path.expanduser(args.images), args.limit)
        print(json.dumps(result["scan"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
