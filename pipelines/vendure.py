"""Importer example: the Vendure sample catalogue (54 real products with real photos).

The npm package `@vendure/create` ships `assets/products.csv` (name, slug, description, assets,
facets such as `category:Electronics|category:Computers|brand:Apple`; variant rows follow their
product with the product columns empty) and the product photos in `assets/images/`. Nothing of it
is stored in this repository (GPL-3.0, 5 MB): `fetch` runs `npm pack` into a cache folder outside the
repository at run time; `to_jsonl` turns the CSV into a raw gammaray catalogue that `gammaray prepare`
reads (images as paths relative to the JSONL file).

    python -m pipelines.vendure OUT_DIR      # fetch (cached) + write OUT_DIR/vendure.jsonl + images
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

PACKAGE = "@vendure/create"


class NpmUnavailable(RuntimeError):
    """npm is missing or the registry cannot be reached: the example cannot run here."""


def cache_dir() -> str:
    return os.environ.get("GAMMARAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gammaray"))


def fetch(cache: str | None = None, version: str | None = None, timeout_s: float = 180) -> str:
    """Path of the unpacked package folder (holding assets/products.csv), fetched once with npm."""
    root = os.path.join(cache or cache_dir(), "vendure")
    os.makedirs(root, exist_ok=True)
    tgzs = sorted(f for f in os.listdir(root) if f.startswith("vendure-create-") and f.endswith(".tgz"))
    if version:
        tgzs = [f for f in tgzs if f == f"vendure-create-{version}.tgz"]
    if not tgzs:
        npm = shutil.which("npm")
        if npm is None:
            raise NpmUnavailable("npm is not installed: the Vendure example needs it (`apt-get install npm`)")
        spec = f"{PACKAGE}@{version}" if version else PACKAGE
        try:
            proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=root, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise NpmUnavailable(f"npm pack {spec} timed out after {timeout_s:.0f} s (registry unreachable?)") from None
        if proc.returncode != 0:
            raise NpmUnavailable(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
        tgzs = sorted(f for f in os.listdir(root) if f.startswith("vendure-create-") and f.endswith(".tgz"))
        if not tgzs:
            raise NpmUnavailable(f"npm pack {spec} wrote no tarball into {root}")
    tgz = os.path.join(root, tgzs[-1])
    out = tgz[: -len(".tgz")]
    if not os.path.exists(os.path.join(out, "package", "assets", "products.csv")):
        tmp = tempfile.mkdtemp(dir=root)
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/assets/")
                       and (m.isfile() or m.isdir()) and ".." not in m.name]
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return os.path.join(out, "package")


def _facets(raw: str) -> tuple[str | None, dict[str, str]]:
    cats, attrs = [], {}
    for item in (raw or "").split("|"):
        if ":" not in item:
            continue
        k, v = (x.strip() for x in item.split(":", 1))
        if k == "category":
            cats.append(v)
        elif k and v:
            attrs[k] = v
    return (" > ".join(cats) or None), attrs


def read_products(package_dir: str) -> list[dict]:
    """One record per product (variant rows are folded into their product's attributes)."""
    path = os.path.join(package_dir, "assets", "products.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        rows = [{k: v.strip() for k, v in zip(header, r)} for r in reader]
    products: list[dict] = []
    for r in rows:
        if r.get("name"):
            category, attrs = _facets(r.get("facets", ""))
            groups = [g.strip() for g in r.get("optionGroups", "").split("|") if g.strip()]
            values = [v.strip() for v in r.get("optionValues", "").split("|") if v.strip()]
            for g, v in zip(groups, values):
                attrs[g] = v
            assets = [a.strip() for a in r.get("assets", "").split("|") if a.strip()]
            products.append({
                "product_id": f"vendure-{r['slug']}",
                "title": r["name"],
                "description": r.get("description") or None,
                "category": category,
                "image": f"images/{assets[0]}" if assets else None,
                "extra_images": [f"images/{a}" for a in assets[1:]] or None,
                "locale": "en",
                "attributes": attrs or None,
                "variants": 1,
            })
        elif products:
            products[-1]["variants"] += 1
    for p in products:
        p["attributes"] = {**(p["attributes"] or {}), "variants": str(p.pop("variants"))}
    return products


def to_jsonl(package_dir: str, out_path: str | None = None) -> str:
    """Write the products as a raw gammaray catalogue beside the images; returns its path."""
    out_path = out_path or os.path.join(package_dir, "assets", "vendure.jsonl")
    with open(out_path, "w", encoding="utf-8") as f:
        for p in read_products(package_dir):
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return out_path


def main() -> None:  # pragma: no cover - a convenience for people, the test drives the functions
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", help="cache folder (default ~/.cache/gammaray or $GAMMARAY_CACHE)")
    args = ap.parse_args()
    pkg = fetch(args.cache)
    print(to_jsonl(pkg))


if __name__ == "__main__":
    main()
