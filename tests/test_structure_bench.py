"""`gammaray bench structure`: the CLI, the row format, the probe and the verdict (the full benchmark
is a script, not a timed test: a tiny run here only checks that the path works end to end)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gammaray.cli import build_parser, main
from workers.benchmarks import structure as bench

pytestmark = pytest.mark.structure


def test_bench_structure_is_registered_and_every_option_has_help(capsys):
    from gammaray.commands.bench import BENCHES, bench_parser

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
