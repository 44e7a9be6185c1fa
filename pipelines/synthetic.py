"""A synthetic product catalogue with an information gap between modalities.

Each product has eight attributes. Two are visible in both modalities (colour and product type, which
fixes the category), two only in the image (pattern and size), and four only in the text: material
and brand appear verbatim in the title (every text embedding keeps them: an easy text-only signal),
care and warranty only as a paraphrase in the description (several phrasings per value, with no word
of the title in it: the hard text-only signal on which a probe can separate models; warranty's number
of years sits next to a number of return days drawn from the same words).
This is the setting of the CVPR 2023 paper's information-gap analysis. Images are rendered
procedurally with PIL; titles and descriptions are templated with synonyms so the text is not a
lookup table. The output is a raw catalogue (JSONL + image files), the input format of
`gammaray prepare`.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# (product noun, category path, shape drawn in the image)
PRODUCTS = [
    ("mug", "Home & Kitchen > Mugs", "circle"),
    ("lamp", "Home & Kitchen > Lamps", "triangle"),
    ("backpack", "Bags > Backpacks", "square"),
    ("speaker", "Electronics > Speakers", "hexagon"),
    ("watch", "Accessories > Watches", "ring"),
    ("vase", "Home & Kitchen > Vases", "diamond"),
]
COLOURS = {
    "red": ((200, 30, 40), ["red", "crimson", "scarlet"]),
    "green": ((40, 160, 60), ["green", "emerald", "forest green"]),
    "blue": ((40, 70, 200), ["blue", "navy", "cobalt"]),
    "yellow": ((235, 205, 40), ["yellow", "lemon", "golden"]),
    "purple": ((130, 50, 160), ["purple", "violet", "plum"]),
    "orange": ((240, 130, 30), ["orange", "tangerine", "amber"]),
    "black": ((25, 25, 25), ["black", "jet black", "charcoal"]),
    "white": ((245, 245, 245), ["white", "snow white", "ivory"]),
}
PATTERNS = ["solid", "stripes", "dots", "checker"]          # image only
SIZES = ["small", "large"]                                  # image only
MATERIALS = ["cotton", "steel", "ceramic", "bamboo", "leather"]  # text only
BRANDS = ["Norda", "Kivo", "Altamira", "Bexley", "Orrin", "Zephyr"]  # text only

# text only, carried by a paraphrase in the description (never a word of the title).
# care: value -> three phrasings, each with words of its own
CARE = {
    "machine_wash": ["safe for the washing machine", "goes in the washer on a gentle cycle",
                     "toss it in with the laundry"],
    "hand_wash": ["rinse it by hand in soapy water", "wash gently by hand, let it dry",
                  "a rinse in the sink keeps it fresh"],
    "wipe_clean": ["a damp cloth is all it needs", "just wipe it down after use",
                   "spills come off with a soft sponge"],
    "dry_clean": ["leave the cleaning to a professional", "keep it dry, use a cleaning service",
                  "only specialist cleaners should treat it"],
}
# warranty: years of cover, written next to a number of days for returns drawn from the same number
# words, so the words alone say "two and five" but not which is the cover; telling them apart takes
# the phrase around the number (harder than care, whose phrasings each have their own words)
WARRANTY_YEARS = {"1y": "one", "2y": "two", "5y": "five", "10y": "ten"}
WARRANTY_TEMPLATES = ["{n} year cover, {m} day returns", "{m} day returns, {n} year cover",
                      "covered {n} years, {m} day returns"]
WARRANTY = {v: [t.replace("{n}", n) for t in WARRANTY_TEMPLATES] for v, n in WARRANTY_YEARS.items()}
RETURN_DAYS = list(WARRANTY_YEARS.values())


def warranty_phrase(value: str, template: int, days: int) -> str:
    return WARRANTY[value][template].replace("{m}", RETURN_DAYS[days])


IMAGE_ONLY = ("pattern", "size")
TEXT_ONLY = ("care", "warranty")          # only a paraphrase in the description carries them
TEXT_VERBATIM = ("material", "brand")     # text only too, but verbatim in the title
SHARED = ("colour", "product")

_DESCRIPTIONS = [
    "A {material} {product} in {colour} from {brand}. Built for everyday use and easy to care for.",
    "{brand} presents this {colour} {product}, made of durable {material}.",
    "Our {material} {product} comes in a {colour} finish. Designed by {brand}.",
    "{colour_cap} {product} by {brand}: {material} construction, thoughtful details.",
]
_TITLES = [
    "{brand} {colour} {material} {product}",
    "{colour_cap} {product} in {material} - {brand}",
    "{brand} {product}, {colour}, {material}",
]


@dataclass(frozen=True)
class Product:
    product_id: str
    product: str
    category: str
    shape: str
    colour: str
    pattern: str
    size: str
    material: str
    brand: str
    care: str
    warranty: str
    phrasing: tuple[int, int, int]   # care's phrasing, warranty's template, its number of return days

    @property
    def attributes(self) -> dict[str, str]:
        return {
            "colour": self.colour,
            "product": self.product,
            "pattern": self.pattern,
            "size": self.size,
            "material": self.material,
            "brand": self.brand,
            "care": self.care,
            "warranty": self.warranty,
        }


def sample_products(n: int, seed: int, id_prefix: str = "SYN") -> list[Product]:
    rng = np.random.default_rng(seed)
    # care and warranty from their own stream: the other attributes, titles and images stay what they
    # were before these two were added
    text_rng = np.random.default_rng([seed, 14])
    out = []
    for i in range(n):
        product, category, shape = PRODUCTS[rng.integers(len(PRODUCTS))]
        care, warranty = list(CARE)[text_rng.integers(len(CARE))], list(WARRANTY)[text_rng.integers(len(WARRANTY))]
        out.append(
            Product(
                product_id=f"{id_prefix}-{i:06d}",
                product=product,
                category=category,
                shape=shape,
                colour=list(COLOURS)[rng.integers(len(COLOURS))],
                pattern=PATTERNS[rng.integers(len(PATTERNS))],
                size=SIZES[rng.integers(len(SIZES))],
                material=MATERIALS[rng.integers(len(MATERIALS))],
                brand=BRANDS[rng.integers(len(BRANDS))],
                care=care,
                warranty=warranty,
                phrasing=(int(text_rng.integers(len(CARE[care]))), int(text_rng.integers(len(WARRANTY_TEMPLATES))),
                          int(text_rng.integers(len(RETURN_DAYS)))),
            )
        )
    return out


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    sides = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6}[shape]
    offset = rot + (math.pi / 4 if shape == "square" else 0.0) + (-math.pi / 2 if shape == "triangle" else 0.0)
    return [(cx + r * math.cos(offset + 2 * math.pi * k / sides), cy + r * math.sin(offset + 2 * math.pi * k / sides))
            for k in range(sides)]


def render_image(p: Product, rng: np.random.Generator, side: int = 96) -> Image.Image:
    """Draw the product: shape = product type, fill = colour, texture = pattern, scale = size."""
    bg = tuple(int(v) for v in rng.integers(150, 215, size=3))
    img = Image.new("RGB", (side, side), bg)
    rgb = np.array(COLOURS[p.colour][0], dtype=float)
    rgb = np.clip(rgb + rng.normal(0, 12, size=3), 0, 255)
    fill = tuple(int(v) for v in rgb)
    accent = tuple(int(v) for v in (rgb * 0.45 if rgb.mean() > 90 else rgb * 0.4 + 150))

    scale = 0.22 if p.size == "small" else 0.40
    r = side * scale * rng.uniform(0.92, 1.08)
    cx = side / 2 + rng.uniform(-0.08, 0.08) * side
    cy = side / 2 + rng.uniform(-0.08, 0.08) * side
    rot = rng.uniform(-0.25, 0.25)

    mask = Image.new("L", (side, side), 0)
    md = ImageDraw.Draw(mask)
    if p.shape in ("circle", "ring"):
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if p.shape == "ring":
            md.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
    else:
        poly = _shape_polygon(p.shape, cx, cy, r * (1.15 if p.shape == "diamond" else 1.0), rot)
        if p.shape == "diamond":
            poly = [(cx + (x - cx) * 0.7, y) for x, y in poly]
        md.polygon(poly, fill=255)

    layer = Image.new("RGB", (side, side), fill)
    ld = ImageDraw.Draw(layer)
    step = max(4, int(side / 12))
    if p.pattern == "stripes":
        for x in range(-side, 2 * side, step):
            ld.line([(x, 0), (x + side, side)], fill=accent, width=max(1, step // 3))
    elif p.pattern == "dots":
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                d = max(1, step // 4)
                ld.ellipse([x - d, y - d, x + d, y + d], fill=accent)
    elif p.pattern == "checker":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if ((x // step) + (y // step)) % 2 == 0:
                    ld.rectangle([x, y, x + step - 1, y + step - 1], fill=accent)
    img.paste(layer, (0, 0), mask)
    # light sensor noise so no two renders are identical
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, size=(side, side, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def describe_product(p: Product, rng: np.random.Generator) -> tuple[str, str]:
    names = COLOURS[p.colour][1]
    colour = names[rng.integers(len(names))]
    fields = dict(
        brand=p.brand, colour=colour, colour_cap=colour.capitalize(), material=p.material, product=p.product
    )
    title = _TITLES[rng.integers(len(_TITLES))].format(**fields)
    desc = _DESCRIPTIONS[rng.integers(len(_DESCRIPTIONS))].format(**fields)
    # care and warranty first: the description's end may be cut by the token budget
    care, warranty = CARE[p.care][p.phrasing[0]], warranty_phrase(p.warranty, p.phrasing[1], p.phrasing[2])
    return title, f"{care.capitalize()}; {warranty}. {desc}"


# a second locale for the text<->text view pair: the title in German, word by word
_DE = {
    "mug": "Becher", "lamp": "Lampe", "backpack": "Rucksack", "speaker": "Lautsprecher", "watch": "Uhr", "vase": "Vase",
    "red": "rot", "green": "gruen", "blue": "blau", "yellow": "gelb", "purple": "lila", "orange": "orange",
    "black": "schwarz", "white": "weiss",
    "cotton": "Baumwolle", "steel": "Stahl", "ceramic": "Keramik", "bamboo": "Bambus", "leather": "Leder",
}


def german_title(p: Product) -> str:
    return f"{p.brand} {_DE[p.product]} aus {_DE[p.material]}, {_DE[p.colour]}"


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_raw_catalogue(
    out_dir: str,
    n_train: int = 3000,
    n_val: int = 500,
    seed: int = 0,
    bad_records: int = 0,
    image_side: int = 96,
    pair_views: bool = False,
    n_test: int = 0,
) -> dict[str, str]:
    """Write `train.jsonl`, `val.jsonl` (and with `n_test` > 0 `test.jsonl`) and `images/*.jpg` under
    out_dir. The test products come after the others, so adding them changes no train or val record.

    `bad_records` > 0 appends realistic faults to the training file (a truncated JPEG, undecodable
    bytes, a missing image file, an empty title, a duplicate product_id), so the demo shows the
    quarantine at work. `pair_views` adds what the other view pairs need: a German title
    (`titles: {"de_DE": ...}`, text_text) and a second photo (`extra_images`, image_image).
    Returns the paths of the JSONL files by split.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    products = sample_products(n_train + n_val + n_test, seed)
    paths = {}
    splits = [("train", products[:n_train]), ("val", products[n_train:n_train + n_val])]
    if n_test > 0:
        splits.append(("test", products[n_train + n_val:]))
    for split, items in splits:
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for p in items:
                rel = f"images/{p.product_id}.jpg"
                with open(os.path.join(out_dir, rel), "wb") as img_f:
                    img_f.write(encode_jpeg(render_image(p, rng, image_side)))
                title, desc = describe_product(p, rng)
                row = _row(p, title, desc, rel)
                if pair_views:
                    rel2 = f"images/{p.product_id}-2.jpg"
                    with open(os.path.join(out_dir, rel2), "wb") as img_f:
                        img_f.write(encode_jpeg(render_image(p, np.random.default_rng([seed, 2, i_of(p)]), image_side)))
                    row["titles"] = {"de_DE": german_title(p)}
                    row["extra_images"] = [rel2]
                f.write(json.dumps(row) + "\n")
            if split == "train" and bad_records > 0:
                for row in _bad_rows(out_dir, products[0], rng, bad_records, image_side):
                    f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def i_of(p: Product) -> int:
    return int(p.product_id.rsplit("-", 1)[-1])


def _row(p: Product, title: str, desc: str, image: str, product_id: str | None = None) -> dict:
    return {
        "product_id": product_id or p.product_id,
        "title": title,
        "description": desc,
        "category": p.category,
        "image": image,
        "locale": "en_US",
        "attributes": p.attributes,
    }


def _bad_rows(out_dir: str, template: Product, rng: np.random.Generator, n: int, side: int) -> list[dict]:
    good = encode_jpeg(render_image(template, rng, side))
    faults = ["truncated", "garbage", "missing_file", "empty_title", "duplicate_id"]
    rows = []
    for k in range(n):
        kind = faults[k % len(faults)]
        pid = f"BAD-{k:04d}"
        rel = f"images/{pid}.jpg"
        title, desc = describe_product(template, rng)
        if kind == "truncated":
            with open(os.path.join(out_dir, rel), "wb") as f:
                f.write(good[: len(good) // 2])
        elif kind == "garbage":
            with open(os.path.join(out_dir, rel), "wb") as f:
                f.write(bytes(rng.integers(0, 256, size=500, dtype=np.uint8)))
        elif kind == "missing_file":
            rel = f"images/{pid}-does-not-exist.jpg"
        elif kind == "empty_title":
            with open(os.path.join(out_dir, rel), "wb") as f:
                f.write(good)
            title = "   "
        elif kind == "duplicate_id":
            with open(os.path.join(out_dir, rel), "wb") as f:
                f.write(good)
            pid = template.product_id
        rows.append(_row(template, title, desc, rel, product_id=pid))
    return rows
