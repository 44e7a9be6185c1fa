"""`gammaray bench structure`: the CLI, the row format, the probe and the verdict (the full benchmark
is a script, not a timed test: a tiny run here only checks that the path works end to end)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gammaray.app.cli import main
from gammaray.app.benchmarks import structure as bench

pytestmark = pytest.mark.structure


def test_bench_structure_is_registered_and_every_option_has_help(capsys):
    from gammaray.app.commands.bench import BENCHES, bench_parser

    assert "structure" in BENCHES
    parser, _ = bench_parser("structure")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for opt in ("--json", "--models", "--variants", "--seeds", "--epochs", "--base", "--lambda-sep", "--jobs",
                "--device", "--set"):
        assert opt in out
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.option_strings


def test_linear_probe_separates_what_is_separable_and_not_noise():
    g = np.random.default_rng(0)
    y = g.integers(0, 3, 400)
    x = g.normal(size=(400, 8))
    x[:, 0] += 6.0 * y  # classes 6 standard deviations apart
    assert bench.linear_probe(x[:300], y[:300], x[300:], y[300:]) > 0.95
    noise = g.normal(size=(400, 8))
    assert bench.linear_probe(noise[:300], y[:300], noise[300:], y[300:]) < 0.6


def _rows(gain: float, jitter: float = 0.0):
    rows = []
    for seed in range(3):
        for variant in bench.VARIANTS:
            delta = gain + (jitter * (-1) ** seed if variant != "plain" else 0.0)
            rows.append({"variant": variant, "model": "two_tower", "seed": seed, "r_at_1": 0.05,
                         "probe_image_only": 0.7 + (delta if variant == "sep" else 0.0),
                         "probe_text_only": 0.8, "probe_shared": 0.9, "modality_gap": 0.3})
    return rows


def test_verdict_needs_a_mean_margin_and_a_gain_on_every_seed(tmp_path):
    assert "some regularizer beats plain" in bench.verdict(_rows(0.05))
    assert "no regularizer beats plain" in bench.verdict(_rows(0.01))
    # mean gain 0.03 but one seed loses: not clear
    assert "no regularizer beats plain" in bench.verdict(_rows(0.03, jitter=0.05))
    gains = bench.paired_gains(_rows(0.05), "probe_image_only")
    assert gains[("two_tower", "sep")] == pytest.approx([0.05] * 3)
    assert gains[("two_tower", "br")] == pytest.approx([0.0] * 3)
    table = bench.format_table(_rows(0.05))
    assert "two_tower plain" in table.replace("  ", " ").replace("  ", " ")
    bench.plot(_rows(0.05), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_a_tiny_benchmark_run_writes_rows_png_and_details(tmp_path):
    out = tmp_path / "rows.json"
    rc = main(["bench", "structure", "--json", str(out), "--n-train", "24", "--n-val", "16", "--epochs", "1",
               "--seeds", "1", "--variants", "plain,sep", "--quiet", "--device", "cpu",
               "--set", "data.batch_size=12", "--set", "model.embed_dim=16", "--set", "data.image_size=32",
               "--set", "model.image.hf_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], "
                        "depths: [1, 1], layer_type: basic}",
               "--set", "model.text.hf_config={model_type: bert, hidden_size: 16, num_hidden_layers: 1, "
                        "num_attention_heads: 2, intermediate_size: 32, max_position_embeddings: 64}"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["plain", "sep"]
    for r in rows:
        assert list(r) == list(bench.ROW_KEYS)
        assert r["model"] == "two_tower" and r["seed"] == 0
        assert 0.0 <= r["probe_image_only"] <= 1.0 and r["modality_gap"] >= 0.0
    assert (tmp_path / "rows.png").exists()
    details = json.loads((tmp_path / "rows.details.json").read_text())
    assert details["steps_per_run"] == 2
    assert "probe_concat_specific" in details["runs"][1] and "probe_concat_specific" not in details["runs"][0]


# --------------------------------------------------------------------------------------------
# `gammaray bench tune-structure`: the picked config against plain on a test split


def _tune_rows(d_r1: float, d_probe: float, seeds=(1, 2, 3)):
    from gammaray.app.benchmarks import tune_structure as ts

    rows = []
    for sd in seeds:
        for v in ts.VARIANTS:
            up = v == "tuned"
            rows.append({"variant": v, "seed": sd, "r_at_1": 0.08 + (d_r1 if up else 0.0) + 0.001 * sd,
                         "probe_image_only": 0.80 + (d_probe if up else 0.0), "probe_text_only": 0.70 + (d_probe if up else 0.0),
                         "probe_shared": 0.95, "config": {}})
    return rows


def test_tune_structure_verdict_needs_both_conditions():
    from gammaray.app.benchmarks import tune_structure as ts

    assert ts.verdict(_tune_rows(-0.004, 0.021))[0]
    assert not ts.verdict(_tune_rows(-0.006, 0.05))[0]      # R@1 lost more than the margin
    assert not ts.verdict(_tune_rows(0.01, 0.019))[0]       # probe gain too small
    ok, text = ts.verdict(_tune_rows(0.0, 0.03))
    assert ok and "+0.0300" in text and "MET" in text
    table = ts.markdown_table(_tune_rows(0.0, 0.03))
    assert table.splitlines()[2].startswith("| plain | 0.082 ± 0.001 | 0.800 ± 0.000 | 0.700 ± 0.000 | 0.750 ± 0.000")


@pytest.mark.timeout(600)
def test_a_tiny_tune_structure_run_writes_rows_on_the_test_split(tmp_path, capsys):
    from gammaray.config import GammarayConfig, apply_overrides, save
    from gammaray.app.benchmarks import tune_structure as ts

    cat = bench.make_catalogue(str(tmp_path / "w"), 24, 8, progress=False, n_test=12)
    assert (cat["train"].size, cat["val"].size, cat["test"].size) == (24, 8, 12)
    root = tmp_path / "w" / "catalog"
    base = apply_overrides(GammarayConfig(), {
        "data.train": str(root / "train"), "data.val": str(root / "val"), "data.tokenizer": str(root / "tokenizer"),
        "data.batch_size": 12, "data.image_size": 32, "model.embed_dim": 16, "train.epochs": 1, "loss.kind": "infonce",
        "loss.structure.in_modal": True,
        "model.image.hf_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                  "layer_type": "basic"},
        "model.text.hf_config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 32, "max_position_embeddings": 64},
        "eval.specific_attributes": {"image": ["pattern", "size"], "text": ["care", "warranty"]},
        "tune.space": {"loss.structure.lambda_sep": {"kind": "loguniform", "low": 0.01, "high": 1.0, "zero": True}}})
    save(base, tmp_path / "plain.yaml")
    save(apply_overrides(base, {"loss.structure.lambda_sep": 0.3}), tmp_path / "tuned.yaml")
    out = tmp_path / "rows.json"
    assert main(["bench", "tune-structure", "--plain", str(tmp_path / "plain.yaml"), "--tuned", str(tmp_path / "tuned.yaml"),
                 "--seeds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [("plain", 1), ("tuned", 1)]
    for r in rows:
        assert list(r) == list(ts.ROW_KEYS)
        assert 0.0 <= r["r_at_1"] <= 1.0 and 0.0 <= r["probe_text_only"] <= 1.0
    assert rows[0]["config"]["loss.structure.lambda_sep"] == 0.0 and rows[1]["config"]["loss.structure.lambda_sep"] == 0.3
    details = json.loads((tmp_path / "rows.details.json").read_text())
    assert details["test"].endswith("test") and all(d["test_records"] == 12 and d["steps"] == 2 for d in details["runs"])
    assert (tmp_path / "rows.png").stat().st_size > 10_000
    # the test split must be one the search never saw
    capsys.readouterr()
    assert main(["bench", "tune-structure", "--plain", str(tmp_path / "plain.yaml"), "--tuned", str(tmp_path / "tuned.yaml"),
                 "--test", str(root / "val"), "--json", str(tmp_path / "x.json")]) == 1
    assert "the search never saw" in capsys.readouterr().err
    # the docs table comes from the JSON
    assert main(["bench", "tune-structure", "--markdown", str(out)]) == 0
    assert "| plain |" in capsys.readouterr().out
