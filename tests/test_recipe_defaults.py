"""The loss defaults are pinned to the study that chose them (`docs/bench/recipe.json`, made by
`gammaray bench recipe`): the shipped values of every searched or ablated key are the ones the
study's "default" rows were trained with, the study is what the docs say it is (>= 2 data sets,
>= 3 seeds per cell, >= 20 epochs, the locked regime at micro-batches 16 and 64), and the tables and
verdict lines in the docs are the ones generated from the committed JSON, not typed."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

pytestmark = pytest.mark.loss
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = "docs/bench/recipe.json"


@pytest.fixture(scope="module")
def study() -> dict:
    with open(os.path.join(ROOT, STUDY)) as f:
        return json.load(f)


def test_shipped_defaults_are_the_ones_the_study_measured(study):
    from gammaray.app.benchmarks.recipe import shipped_defaults

    assert study["defaults"] == shipped_defaults(), (
        "a loss default moved away from the study that chose it: rerun the command in "
        f"{STUDY} ('command') and update the docs, or restore the default")


def test_the_study_has_the_seeds_epochs_and_data_sets_it_claims(study):
    seeds = defaultdict(set)
    for r in study["rows"]:
        seeds[(r["dataset"], r["regime"], r["loss"], json.dumps(r["settings"], sort_keys=True), r.get("variant", ""),
               r["batch_size"])].add(r["seed"])
        if r["regime"] == "locked":
            assert r["epochs"] >= 20, r
    assert min(len(s) for s in seeds.values()) >= 3
    locked = {(d, loss, b) for (d, regime, loss, s, v, b) in seeds if regime == "locked" and s == '"default"'}
    datasets = {d for d, _, _ in locked}
    assert len(datasets) >= 2
    for d in datasets:
        for loss in ("gamma", "infonce"):
            assert {(d, loss, 16), (d, loss, 64)} <= locked, (d, loss)


def test_the_docs_show_what_the_json_generates(study):
    from gammaray.app.benchmarks.recipe import report, verdict

    cwd = os.getcwd()
    os.chdir(ROOT)  # the report names the JSON by the path it was given
    try:
        generated = report(STUDY)
    finally:
        os.chdir(cwd)
    with open(os.path.join(ROOT, "docs/bench/recipe.md")) as f:
        page = f.read()
    assert generated.strip() in page, "docs/bench/recipe.md: regenerate with `python -m gammaray.app.docs`"
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for line in verdict(study["rows"]):
        assert line in readme, f"README lacks the generated verdict line: {line}"
