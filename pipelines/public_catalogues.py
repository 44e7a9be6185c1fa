"""Real image-text catalogues that a package registry ships, as raw catalogues for `gammaray prepare`.

Nothing of them is stored in this repository: each is fetched at run time with the ordinary client
into the cache (`$GAMMARAY_CACHE`, default ~/.cache/gammaray), and `Unavailable` says which client is
missing where it cannot be had.

- `openclipart`: Debian's openclipart-png + openclipart-svg (public domain clip art): title
  (dc:title), tags (dc:subject) and description, the folder path as the category. Records whose
  text repeats another's are dropped (about 3,500 of 8,121 are left).
- `emoji`: npm's emoji-datasource-google (Noto Color Emoji, 64 px PNG, Apache-2.0; names, category,
  subcategory, MIT) + emojilib (English keywords, MIT): one record per emoji without skin-tone
  variants (about 1,900): the name as the title, the keywords as the description,
  "Category > subcategory" as the category.
- `synthetic`: the project's procedural catalogue (pipelines/synthetic.py), for comparison.

`hold_out_category` turns a catalogue's category into an attribute only the image carries (its words
taken out of every text), for the modality-specific probes (`gammaray bench tune-structure
--make-catalogue W --catalogue openclipart`).

`write_splits` writes `train.jsonl`, `val.jsonl`, `test.jsonl` (+ image files) with a seeded split:
the validation split is for tuning, the test split for the final figures only.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tarfile

import numpy as np

EMOJI_PACKAGES = {"emoji-datasource-google": "16.0.0", "emojilib": "4.0.3"}


class Unavailable(RuntimeError):
    """A data set that cannot be had on this machine (a missing client or registry)."""


def cache_dir() -> str:
    return os.environ.get("GAMMARAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gammaray"))


# --------------------------------------------------------------------------------------------
# openclipart (Debian)

_TITLE = re.compile(r"<dc:title>([^<]*)</dc:title>")
_DESC = re.compile(r"<dc:description>([^<]*)</dc:description>")
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>([^<]*)</rdf:li>")


def fetch_openclipart(cache: str) -> str:
    """Debian's openclipart-png + openclipart-svg unpacked under the cache; returns .../openclipart."""
    base = os.path.join(cache, "openclipart")
    share = os.path.join(base, "root", "usr", "share", "openclipart")
    if os.path.isdir(os.path.join(share, "png")) and os.path.isdir(os.path.join(share, "svg")):
        return share
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise Unavailable(f"openclipart: `{tool}` not found (a Debian/Ubuntu package client is needed to fetch "
                              "openclipart-png and openclipart-svg); skipped")
    os.makedirs(base, exist_ok=True)
    print("openclipart: apt-get download openclipart-png openclipart-svg (about 156 MB) ...", flush=True)
    proc = subprocess.run(["apt-get", "download", "openclipart-png", "openclipart-svg"], cwd=base,
                          capture_output=True, text=True)
    debs = glob.glob(os.path.join(base, "openclipart-*.deb"))
    if proc.returncode != 0 or len(debs) < 2:
        raise Unavailable(f"openclipart: apt-get download failed (run `apt-get update` first?): "
                          f"{proc.stderr.strip()[-300:]}; skipped")
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(base, "root")], check=True)
    return share


def openclipart_records(cache: str, n_val: int, seed: int = 0, max_records: int = 0) -> tuple[list[dict], list[dict]]:
    """One record per clip art (image as PNG bytes), deduplicated by text; a seeded (train, val) split."""
    records = openclipart_all(cache)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    if max_records:
        order = order[:max_records]
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def openclipart_all(cache: str) -> list[dict]:
    share = fetch_openclipart(cache)
    records, seen = [], set()
    for svg in sorted(glob.glob(os.path.join(share, "svg", "**", "*.svg"), recursive=True)):
        rel = os.path.relpath(svg, os.path.join(share, "svg"))
        png = os.path.join(share, "png", os.path.splitext(rel)[0] + ".png")
        if not os.path.exists(png):
            continue
        with open(svg, "rb") as f:
            head = f.read(20000).decode("utf-8", "replace")
        m = _TITLE.search(head)
        title = (m.group(1).strip() if m else "") or os.path.splitext(os.path.basename(rel))[0].replace("_", " ")
        subj = _SUBJECT.search(head)
        tags = [t.strip() for t in _LI.findall(subj.group(1))] if subj else []
        d = _DESC.search(head)
        desc = ", ".join([t for t in tags if t and t != "unsorted"] + ([d.group(1).strip()] if d and d.group(1).strip() else []))
        category = " > ".join(os.path.dirname(rel).split(os.sep))
        key = (title.lower(), category, desc.lower())
        if key in seen:
            continue
        seen.add(key)
        with open(png, "rb") as f:
            records.append({"product_id": rel, "title": title, "description": desc, "category": category,
                            "image": f.read()})
    return records


# --------------------------------------------------------------------------------------------
# a category held out of the text: an attribute only the image carries

# words of a category name that say nothing about it (kept in the text)
_STOPWORDS = {"and", "or", "of", "the", "a", "an", "in", "for"}
# forms of a category word that the plural/singular rules below do not make
_FORMS = {"people": ("person", "persons"), "transportation": ("transport", "transports"),
          "electronics": ("electronic",), "geography": ("geographic", "geographical"),
          "recreation": ("recreational",), "science": ("scientific",), "education": ("educational",),
          "decorations": ("decorative",)}
_WORD = re.compile(r"[A-Za-z]+")


def category_words(name: str) -> set[str]:
    """The lower-case words that name a category folder ("signs_and_symbols" -> sign, signs, symbol,
    symbols), with their plural and singular forms and the few derived forms of _FORMS, and the
    name itself as one phrase (signs_and_symbols, signs and symbols, signs & symbols)."""
    words = _WORD.findall(name.lower())
    out: set[str] = {"_".join(words), " ".join(words), " & ".join(w for w in words if w not in _STOPWORDS)}
    for w in words:
        if w in _STOPWORDS:
            continue
        out.update({w, *_FORMS.get(w, ())})
        if w.endswith("ies"):
            out.add(w[:-3] + "y")
        elif w.endswith("y"):
            out.add(w[:-1] + "ies")
        if w.endswith("s"):
            out.add(w[:-1])
        else:
            out.update({w + "s", w + "es"})
    return out


def strip_words(text: str, words: set[str]) -> str:
    """`text` without any of `words` (case-insensitive, whole words: letters on neither side, so the
    parts of "signs_and_symbols/weather" go too); each comma-separated part is cleaned of the
    punctuation left at its ends and dropped when nothing is left."""
    if not text or not words:
        return text
    pattern = re.compile(r"(?<![A-Za-z])(?:" + "|".join(sorted(map(re.escape, words), key=len, reverse=True))
                         + r")(?![A-Za-z])", re.I)
    parts = []
    for part in text.split(","):
        part = re.sub(r"\s+", " ", pattern.sub(" ", part))
        part = re.sub(r"^[\s_/&\-]+|[\s_/&\-]+$", "", part)
        part = re.sub(r"[_/]{2,}", "_", part)
        if part and re.search(r"[A-Za-z0-9]", part):
            parts.append(part)
    return ", ".join(parts)


def hold_out_category(records: list[dict], attribute: str = "category", min_records: int = 20,
                      not_a_class: tuple[str, ...] = ("unsorted",)) -> tuple[list[dict], dict]:
    """The records with their top-level category moved out of the text into `attributes[attribute]`:
    the `category` field is removed (it is part of the text view) and every word of every class's
    name (category_words) is stripped from the title and the description of every record, so no
    text names a class. A category with fewer than `min_records` records, or in `not_a_class`, gets
    no attribute (the probes leave such records out); its records still train. A record whose
    title is empty after the removal takes its description's first part as the title; one with no
    text left is left out. Returns (records, report: classes with their counts, records left out)."""
    from collections import Counter

    top = [(r.get("category") or "").split(" > ")[0].strip() for r in records]
    counts = Counter(t for t in top if t)
    classes = sorted(c for c, n in counts.items() if n >= min_records and c not in not_a_class)
    words = set().union(*(category_words(c) for c in classes)) if classes else set()
    out, no_text = [], []
    for r, cat in zip(records, top):
        title = strip_words(r.get("title") or "", words)
        desc = strip_words(r.get("description") or "", words)
        if not title.strip():
            first, _, rest = desc.partition(", ")
            title, desc = first, rest
        if not title.strip():
            no_text.append(r.get("product_id"))
            continue
        rec = {k: v for k, v in r.items() if k != "category"}
        rec.update(title=title, description=desc,
                   attributes={**(r.get("attributes") or {}), **({attribute: cat} if cat in classes else {})})
        out.append(rec)
    report = {"classes": {c: counts[c] for c in classes},
              "without_attribute": {c: n for c, n in counts.items() if c not in classes},
              "left_out_no_text": no_text, "removed_words": sorted(words)}
    return out, report


# --------------------------------------------------------------------------------------------
# emoji (npm)


def npm_package(name: str, version: str, cache: str, timeout_s: float = 300) -> str:
    """`npm pack name@version` unpacked under the cache; returns the package folder."""
    root = os.path.join(cache, "npm", f"{name}-{version}")
    pkg = os.path.join(root, "package")
    if os.path.isfile(os.path.join(pkg, "package.json")):
        return pkg
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable(f"{name}: `npm` not found (install Node.js/npm to fetch it from the npm registry); skipped")
    os.makedirs(root, exist_ok=True)
    try:
        proc = subprocess.run([npm, "pack", f"{name}@{version}", "--silent"], cwd=root, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"npm pack {name}@{version} timed out after {timeout_s:.0f} s (registry unreachable?)") from None
    tgzs = glob.glob(os.path.join(root, "*.tgz"))
    if proc.returncode != 0 or not tgzs:
        raise Unavailable(f"npm pack {name}@{version} failed: {proc.stderr.strip()[-300:]}")
    with tarfile.open(tgzs[0]) as tar:
        tar.extractall(root, filter="data")
    os.remove(tgzs[0])
    return pkg


def emoji_all(cache: str) -> list[dict]:
    """One record per emoji of emoji-datasource-google that has a Google image, skin-tone variants
    and the 'Component' category (bare skin tones, hair styles) left out."""
    data = npm_package("emoji-datasource-google", EMOJI_PACKAGES["emoji-datasource-google"], cache)
    lib = npm_package("emojilib", EMOJI_PACKAGES["emojilib"], cache)
    with open(os.path.join(data, "emoji.json")) as f:
        table = json.load(f)
    with open(os.path.join(lib, "dist", "emoji-en-US.json")) as f:
        keywords = json.load(f)
    records = []
    for e in sorted(table, key=lambda e: e["sort_order"]):
        if not e.get("has_img_google") or e["category"] == "Component":
            continue
        path = os.path.join(data, "img", "google", "64", e["image"])
        if not os.path.exists(path):
            continue
        char = "".join(chr(int(c, 16)) for c in e["unified"].split("-"))
        words = keywords.get(char) or keywords.get(char.replace("\ufe0f", "")) or []
        name = (e.get("name") or e["short_name"].replace("_", " ")).lower()
        desc = ", ".join(w.replace("_", " ") for w in words[1:])  # the first keyword is the name again
        with open(path, "rb") as f:
            records.append({"product_id": e["unified"].lower(), "title": name, "description": desc,
                            "category": f"{e['category']} > {e['subcategory']}", "image": f.read()})
    return records


# --------------------------------------------------------------------------------------------
# splits as raw catalogues


def write_splits(records: list[dict], out_dir: str, n_val: int, n_test: int, seed: int = 0,
                 image_ext: str = ".png") -> dict[str, str]:
    """`records` (image as bytes) -> out_dir/{train,val,test}.jsonl + images/; a seeded split. Returns
    the JSONL paths. Idempotent: an existing complete folder is reused."""
    paths = {s: os.path.join(out_dir, f"{s}.jsonl") for s in ("train", "val", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    if n_val + n_test >= len(records):
        raise ValueError(f"{len(records)} records cannot give {n_val} validation and {n_test} test records")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "images"))
    order = np.random.default_rng([seed, 5]).permutation(len(records))
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    for split, rows in parts.items():
        with open(os.path.join(tmp, f"{split}.jsonl"), "w") as f:
            for i in rows:
                r = dict(records[i])
                rel = f"images/{i:06d}{image_ext}"
                with open(os.path.join(tmp, rel), "wb") as img:
                    img.write(r.pop("image"))
                f.write(json.dumps({**r, "image": rel}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return paths


def synthetic_splits(out_dir: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, str]:
    """The synthetic catalogue as train/val/test (one generator run, its held-out part cut in two)."""
    from .synthetic import write_raw_catalogue

    paths = {s: os.path.join(out_dir, f"{s}.jsonl") for s in ("train", "val", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    raw = write_raw_catalogue(tmp, n_train=n_train, n_val=n_val + n_test, seed=seed)
    with open(raw["val"]) as f:
        rows = f.readlines()
    with open(os.path.join(tmp, "test.jsonl"), "w") as f:
        f.writelines(rows[n_val:])
    with open(os.path.join(tmp, "val.jsonl"), "w") as f:
        f.writelines(rows[:n_val])
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return paths
