"""A real catalogue's category held out of the text (pipelines/public_catalogues.py hold_out_category), as
`gammaray bench tune-structure --make-catalogue W --catalogue openclipart` makes it: the class words are
gone from every text and the class reaches the probes as the attribute `category` through prepare. Fake
openclipart-like records, nothing fetched."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from pipelines.public_catalogues import category_words, hold_out_category, strip_words

pytestmark = pytest.mark.tune

# (folder, title, tags + description as openclipart_all joins them)
FAKE = [
    ("animals > birds", "Blue Bird", "animal, bird, blue"),
    ("animals", "Animals Crossing", "cat, dog, ANIMALS"),
    ("animals > mammals", "Tiger", "mammal, tiger, an animal of the jungle"),
    ("food > fruit", "Green Pear", "food, fruit, pear"),
    ("food", "Foods", "food"),                                   # only class words: no text left
    ("food > beverages", "Wine Glass", "foods, beverage, glass"),
    ("signs_and_symbols > weather", "Tsunami warning sign", "signs_and_symbols/weather, tsunami, Sign"),
    ("signs_and_symbols > flags", "Canada Flag", "symbol, flag, canada"),
    ("signs_and_symbols", "Stop Signs & Symbols", "road, stop"),
    ("people", "Person waving", "people, persons, hand"),
    ("people", "Stickman", "human, stick"),
    ("people > faces", "Smiling face", "face, smile"),
    ("unsorted", "Anatra", "duck"),                               # not a class: no attribute
    ("transportation > vehicles", "Bus", "transport, bus, vehicle"),  # 1 record: too few for a class
]
CLASSES = {"animals", "food", "signs_and_symbols", "people"}


def _png(seed: int) -> bytes:
    from PIL import Image

    rgba = np.random.default_rng(seed).integers(0, 256, (20, 24, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _records() -> list[dict]:
    return [{"product_id": f"{cat.replace(' > ', '/')}/{i}.svg", "title": t, "description": d, "category": cat,
             "image": _png(i)} for i, (cat, t, d) in enumerate(FAKE)]


def test_category_words_cover_the_name_its_forms_and_its_phrase_not_stopwords():
    assert {"sign", "signs", "symbol", "symbols", "signs_and_symbols", "signs and symbols"} <= category_words(
        "signs_and_symbols")
    assert "and" not in category_words("signs_and_symbols")
    assert {"people", "person", "persons"} <= category_words("people")
    assert {"transportation", "transport"} <= category_words("transportation")
    assert strip_words("signs_and_symbols/weather, tsunami, Sign", category_words("signs_and_symbols")) == \
        "weather, tsunami"
    assert strip_words("signpost, assign", {"sign"}) == "signpost, assign"  # whole words only


def test_held_out_category_leaves_no_class_word_in_any_text_and_reaches_the_probes_through_prepare(tmp_path):
    from gammaray.app.benchmarks.tune_structure import input_probes, make_openclipart_catalogue
    from pipelines.tokenizer import load as load_tokenizer
    from workers.evaluation.metrics import specific_probes

    held, report = hold_out_category(_records(), min_records=2)
    assert set(report["classes"]) == CLASSES
    assert report["without_attribute"] == {"unsorted": 1, "transportation": 1}
    assert report["left_out_no_text"] == ["food/4.svg"]
    banned = set().union(*(category_words(c) for c in CLASSES))
    for r in held:
        assert "category" not in r  # the category field is part of the text view
        words = {w.lower() for w in re.findall(r"[A-Za-z]+", r["title"] + " " + r["description"])}
        assert not words & banned, (r["product_id"], words & banned)
        assert r["title"].strip()
        folder = r["product_id"].split("/")[0]
        assert r["attributes"] == ({"category": folder} if folder in CLASSES else {})
    by_id = {r["product_id"]: r for r in held}
    assert by_id["animals/1.svg"]["title"] == "Crossing" and by_id["animals/1.svg"]["description"] == "cat, dog"
    assert by_id["food/fruit/3.svg"]["description"] == "fruit, pear"
    assert by_id["transportation/vehicles/13.svg"]["description"] == "transport, bus, vehicle"  # not a class
    # a title of class words only takes the description's first part
    assert by_id["signs_and_symbols/8.svg"]["title"] == "Stop"  # "Signs & Symbols" went as one phrase
    assert by_id["people/10.svg"]["title"] == "Stickman"

    cat = make_openclipart_catalogue(str(tmp_path / "w"), n_val=3, n_test=3, records=_records(), min_records=2)
    assert (cat["train"].size, cat["val"].size, cat["test"].size) == (7, 3, 3)
    tok = load_tokenizer(cat["tokenizer"])
    vocab = {w.lower().lstrip("#") for w in tok.get_vocab()}
    assert not vocab & banned, vocab & banned  # no class word reached the tokenizer's training texts
    for split in ("train", "val", "test"):
        labels = cat[split].labels
        assert set(labels["category"]) == {None}
        held_classes = [c for c in labels["attr:category"] if c is not None]
        assert set(held_classes) <= CLASSES
    # the probes read it as an image-only attribute; no text side: the objective is the image side alone
    lab = cat["train"].labels
    g = np.random.default_rng(0)
    emb = {"image": g.normal(size=(cat["train"].size, 4)), "text": g.normal(size=(cat["train"].size, 4))}
    out = specific_probes(emb, lab, {"image": ["category"]}, seed=0)
    assert "probe_text_only" not in out and out["probe_specific"] == out["probe_image_only"]
    # the same attribute probed from the raw inputs (no model): pixels and a bag of words
    raw = input_probes(cat["train"], cat["test"])
    assert list(raw) == ["category"] and raw["category"]["test_records"] == 3
    assert all(0.0 <= raw["category"][k] <= 1.0 for k in ("pixels", "words", "majority"))


def test_tune_structure_summary_with_one_side_and_no_shared_attribute():
    from gammaray.app.benchmarks import tune_structure as ts

    rows = [{"variant": v, "seed": sd, "r_at_1": 0.1, "probe_image_only": 0.5 + (0.03 if v == "tuned" else 0.0),
             "probe_text_only": None, "probe_shared": None, "config": {}} for sd in (1, 2) for v in ts.VARIANTS]
    assert ts.specific(rows[1]) == pytest.approx(0.53)
    ok, text = ts.verdict(rows)
    assert ok and "modality-specific probe +0.0300" in text
    table = ts.markdown_table(rows).splitlines()
    assert table[2] == "| plain | 0.100 ± 0.000 | 0.500 ± 0.000 | – | 0.500 ± 0.000 | – |"
