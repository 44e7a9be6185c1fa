"""The synthetic catalogue's information gap (pipelines/synthetic.py): image-only attributes are drawn,
text-only ones are written, and the hard text-only attributes (care, warranty) reach the text only
as a paraphrase: no word of the title, within the default token budget, several phrasings per value."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipelines import synthetic as syn

pytestmark = pytest.mark.structure


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_paraphrased_attributes_share_no_word_with_the_title_and_vary_in_phrasing():
    rng = np.random.default_rng(0)
    products = syn.sample_products(600, seed=5)
    phrasings: dict[tuple[str, str], set[str]] = {}
    for p in products:
        title, desc = syn.describe_product(p, rng)
        care, warranty = syn.CARE[p.care][p.phrasing[0]], syn.warranty_phrase(p.warranty, p.phrasing[1], p.phrasing[2])
        assert desc.lower().startswith(f"{care}; {warranty}.".lower())
        # the title templates' own glue words ("in") say nothing about any attribute
        content = _words(title) - _words(" ".join(syn._TITLES))
        assert not (_words(care) | _words(warranty)) & content, (title, desc)
        phrasings.setdefault(("care", p.care), set()).add(care)
        phrasings.setdefault(("warranty", p.warranty), set()).add(warranty)
        assert p.attributes["care"] == p.care and p.attributes["warranty"] == p.warranty
        # the years of cover are the number next to "year(s)"/"cover"; the other number is return days
        years = syn.WARRANTY_YEARS[p.warranty]
        assert f"{years} year" in warranty and f"{syn.RETURN_DAYS[p.phrasing[2]]} day" in warranty
    # every value of both attributes occurs, care in all three phrasings, warranty in 3 templates x 4 day counts
    assert {k for k in phrasings} == {("care", v) for v in syn.CARE} | {("warranty", v) for v in syn.WARRANTY}
    assert all(len(v) == 3 for k, v in phrasings.items() if k[0] == "care")
    assert all(len(v) == 12 for k, v in phrasings.items() if k[0] == "warranty")
    # care: no phrasing is shared by two values, none is a single give-away word
    care_phrases = [ph for v in syn.CARE.values() for ph in v]
    assert len(care_phrases) == len(set(care_phrases)) and all(len(ph.split()) >= 3 for ph in care_phrases)
    # warranty: every value's words occur with every other value too (as return days): no word alone is the label
    words = {v: set().union(*(_words(ph) for ph in ps)) for (a, v), ps in phrasings.items() if a == "warranty"}
    assert all(ws == words["1y"] for ws in words.values())


def test_adding_the_paraphrased_attributes_and_a_test_split_keeps_every_other_record(tmp_path):
    """care/warranty come from their own random stream and the test split comes last: the first
    products, their other attributes, titles and images are what a catalogue without them holds."""
    a = syn.write_raw_catalogue(str(tmp_path / "a"), n_train=12, n_val=6, seed=2, image_side=24)
    b = syn.write_raw_catalogue(str(tmp_path / "b"), n_train=12, n_val=6, seed=2, image_side=24, n_test=5)
    assert "test" not in a and sum(1 for _ in open(b["test"])) == 5
    for split in ("train", "val"):
        ra = [json.loads(line) for line in open(a[split])]
        rb = [json.loads(line) for line in open(b[split])]
        assert ra == rb
        for r in ra:
            assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
    test_ids = {json.loads(line)["product_id"] for line in open(b["test"])}
    train_val_ids = {json.loads(line)["product_id"] for s in ("train", "val") for line in open(b[s])}
    assert not test_ids & train_val_ids


def test_paraphrases_fit_the_default_text_budget(tmp_path):
    """title. category. care; warranty. comes first in the record text, within data.max_text_tokens."""
    from gammaray.config import GammarayConfig
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.preprocess import record_text
    from pipelines.tokenizer import build_for_catalogue, load

    paths = syn.write_raw_catalogue(str(tmp_path / "raw"), n_train=240, n_val=0, seed=0, image_side=16)
    res = prepare(paths["train"], str(tmp_path / "cat"), PrepareOptions(progress=False))
    build_for_catalogue(str(tmp_path / "cat"), str(tmp_path / "tok"), res.manifest, vocab_size=500)
    tok = load(str(tmp_path / "tok"))
    budget = GammarayConfig().data.max_text_tokens
    for line in open(paths["train"]):
        r = json.loads(line)
        head = ". ".join(record_text(r["title"], r["description"], r["category"]).split(". ")[:3])
        ids = tok(head, max_length=budget, truncation=True)["input_ids"]
        assert len(tok(head)["input_ids"]) <= budget, head  # nothing of the paraphrase is cut
        assert ids == tok(head)["input_ids"]
