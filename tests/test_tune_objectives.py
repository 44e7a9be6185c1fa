"""A search with two objectives (tuning/objectives.py, tuning/inprocess.py): the modality-specific probe
metric, the Pareto front and the pick rule on hand-made trials, Optuna told the truth about trials ASHA
stopped, ASHA never stopping the baseline, and one real multi-objective search of tiny in-process
trials (Ray Tune + Optuna on the session Ray instance, the catalogue in the session S3 server) whose
picked config then trains with `gammaray pretrain`."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from gammaray.config import ConfigError, GammarayConfig, apply_overrides, get_value, load
from tests.conftest import tiny_overrides
from tuning import objectives as O, report, space

pytestmark = pytest.mark.tune

TIME_FACTOR = float(os.environ.get("GAMMARAY_TEST_TIME_FACTOR", "1"))
A, B = "val_r_at_1", "val_probe_specific"


def row(tid: str, a: float | None, b: float | None, status: str = report.COMPLETED, **values) -> report.TrialRow:
    obj = {k: v for k, v in ((A, a), (B, b)) if v is not None}
    return report.TrialRow(tid, values, a, 10, status, objectives=obj)


# --------------------------------------------------------------------------------------------
# the modality-specific probe metric (workers/evaluation/evaluate.py)


def test_specific_probes_measure_what_each_embedding_keeps_of_its_own_attributes():
    from workers.evaluation.metrics import specific_probes

    g = np.random.default_rng(0)
    n = 200
    pattern = g.integers(0, 4, n)
    care = g.integers(0, 3, n)
    image, text = g.normal(size=(n, 8)), g.normal(size=(n, 8))
    image[:, 0] += 4.0 * pattern      # the image embedding separates pattern; the text one knows nothing
    cols = {"attr:pattern": [str(v) for v in pattern], "attr:care": [str(v) for v in care]}
    m = specific_probes({"image": image, "text": text}, cols, {"image": ["pattern"], "text": ["care"]}, seed=0)
    assert m["probe_image_only_pattern"] > 0.9 and m["probe_image_only"] == m["probe_image_only_pattern"]
    assert m["probe_text_only_care"] < 0.5  # chance 1/3
    assert m["probe_specific"] == pytest.approx(0.5 * (m["probe_image_only"] + m["probe_text_only"]))
    # two-fold: every record is tested once, by the probe fitted on the other half
    same = specific_probes({"image": image, "text": text}, cols, {"image": ["pattern"]}, seed=0)
    assert same["probe_image_only"] == m["probe_image_only"] and "probe_text_only" not in same
    # fitted on another split instead: a probe from its own records scores (nearly) perfectly
    fit = specific_probes({"image": image, "text": text}, cols, {"image": ["pattern"]}, seed=0,
                          fit=({"image": image, "text": text}, cols))
    assert fit["probe_image_only"] > 0.95
    # records without the attribute are left out; an attribute no record has is an error naming it
    cols_gap = {**cols, "attr:pattern": [None] * 20 + cols["attr:pattern"][20:]}
    assert specific_probes({"image": image, "text": text}, cols_gap, {"image": ["pattern"]}, 0)["probe_image_only"] > 0.9
    with pytest.raises(ValueError, match=r"eval.specific_attributes.text: no record carries the attribute 'warranty'"):
        specific_probes({"image": image, "text": text}, cols, {"text": ["warranty"]}, 0)
    # too few records to split: no figure rather than a NaN
    assert specific_probes({"image": image[:1], "text": text[:1]}, {"attr:pattern": ["1"]}, {"image": ["pattern"]}, 0) == {}


# --------------------------------------------------------------------------------------------
# front and pick


def test_pareto_front_keeps_only_undominated_completed_trials():
    rows = [row("base", 0.080, 0.70), row("r1", 0.085, 0.68), row("p1", 0.070, 0.80), row("dom", 0.075, 0.69),
            row("tie", 0.080, 0.70), row("stop", 0.20, 0.99, report.STOPPED), row("noprobe", 0.30, None)]
    front = O.pareto_front(rows, [A, B])
    assert [r.trial_id for r in front] == ["p1", "base", "tie", "r1"]  # sorted by R@1; equal points both stay


def test_pick_holds_r_at_1_within_the_margin_and_maximises_the_probe():
    base = row("base", 0.080, 0.70)
    rows = [base, row("close", 0.0760, 0.74), row("far", 0.070, 0.90), row("ok", 0.0752, 0.73),
            row("stop", 0.081, 0.99, report.STOPPED)]
    p = O.pick(rows, [A, B], base, margin=0.005)
    assert p.row.trial_id == "close" and p.threshold == pytest.approx(0.075)
    assert "0.7400" in p.reason and "margin 0.005" in p.reason
    # a wider margin admits the stronger regularizer
    assert O.pick(rows, [A, B], base, margin=0.02).row.trial_id == "far"
    # nothing pays: the baseline itself (also on an exact tie)
    flat = [base, row("tie", 0.080, 0.70), row("worse", 0.079, 0.65)]
    p = O.pick(flat, [A, B], base, margin=0.005)
    assert p.row.trial_id == "base" and "the baseline" in p.reason
    # no usable baseline: no pick, and the reason says why
    assert O.pick(rows, [A, B], None, 0.005).row is None
    p = O.pick(rows, [A, B], row("b2", 0.08, 0.7, report.STOPPED), 0.005)
    assert p.row is None and "no final" in p.reason


def test_the_baseline_is_the_trial_of_the_first_point_to_evaluate():
    cfg = apply_overrides(GammarayConfig(), {
        "data.train": "/x", "data.val": "/y",
        "tune.space": {"loss.structure.lambda_sep": {"kind": "loguniform", "low": 0.01, "high": 1, "zero": True}},
        "tune.points_to_evaluate": [{}]})
    rows = [row("a", 0.1, 0.5, **{"loss.structure.lambda_sep": 0.3}),
            row("b", 0.05, 0.5, report.STOPPED, **{"loss.structure.lambda_sep": 0.0}),
            row("c", 0.1, 0.5, **{"loss.structure.lambda_sep": 0.0})]
    # weight 0 = the base config. "b" has the same values (the searcher proposed them again, as Optuna
    # does when a `#zero` switch is on) but ASHA stopped it: the completed one is the baseline
    assert O.find_baseline(rows, cfg).trial_id == "c"


def test_objectives_are_validated_before_anything_starts():
    base = {"data.train": "/x", "data.val": "/y", "tune.points_to_evaluate": [{}]}
    with pytest.raises(ConfigError, match="give two different validation metrics"):
        space.validate(apply_overrides(GammarayConfig(), {**base, "tune.objectives": [A]}))
    with pytest.raises(ConfigError, match="'r_at_1' is not a validation metric"):
        space.validate(apply_overrides(GammarayConfig(), {**base, "tune.objectives": ["r_at_1", B]}))
    with pytest.raises(ConfigError, match="needs eval.specific_attributes"):
        space.validate(apply_overrides(GammarayConfig(), {**base, "tune.objectives": [A, B]}))
    with pytest.raises(ConfigError, match=r"tune.points_to_evaluate\[0\]"):
        space.validate(apply_overrides(GammarayConfig(), {
            **base, "tune.points_to_evaluate": [], "tune.objectives": [A, B],
            "eval.specific_attributes": {"image": ["pattern"]}}))
    space.validate(apply_overrides(GammarayConfig(), {**base, "tune.objectives": [A, B],
                                                      "eval.specific_attributes": {"image": ["pattern"]}}))


# --------------------------------------------------------------------------------------------
# the searcher and the scheduler


def test_optuna_is_told_final_values_pruned_for_stopped_and_fail_for_missing_objectives():
    from optuna.trial import TrialState
    from ray import tune

    s = O.ParetoOptunaSearch(metric=[A, B], mode=["max", "max"], seed=0)
    s.set_search_properties(None, None, {"x": tune.uniform(0, 1)})
    for tid in ("done", "stopped", "missing", "error"):
        assert s.suggest(tid) is not None
    s.on_trial_complete("done", {A: 0.1, B: 0.7, "final": True, "step": 10})
    s.on_trial_complete("stopped", {A: 0.2, B: 0.9, "final": False, "step": 4})
    s.on_trial_complete("missing", {A: 0.2, "final": True, "step": 10})
    s.on_trial_complete("error", None, error=True)
    trials = {t.number: t for t in s._ot_study.trials}
    assert [trials[i].state for i in range(4)] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                                   TrialState.FAIL]
    assert trials[0].values == [0.1, 0.7]
    assert len(s._ot_study.directions) == 2


def _report_steps(config):
    from ray import tune

    for step in (1, 2, 3):
        tune.report({"step": step, "m": config["x"]})


@pytest.mark.timeout(int(300 * TIME_FACTOR))
@pytest.mark.parametrize("protect", [True, False])
def test_asha_never_stops_the_protected_baseline(ray_local, tmp_path, protect):
    from ray import tune

    from gammaray.config import StorageConfig
    from tuning.asha import STATE_FILE, RungMemoryASHA

    sched = RungMemoryASHA(str(tmp_path / STATE_FILE), StorageConfig(), protect=[{"x": 0.1}] if protect else [],
                           time_attr="step", max_t=2, grace_period=1, reduction_factor=2, stop_last_trials=False)
    tuner = tune.Tuner(_report_steps, param_space={"x": tune.grid_search([1.0, 0.1, 0.5])},
                       tune_config=tune.TuneConfig(metric="m", mode="max", scheduler=sched, max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0))
    steps = {r.config["x"]: r.metrics["step"] for r in tuner.fit()}
    # 0.1 meets 1.0 at the rung: stopped there unless protected (it is recorded at the rung either
    # way, so 0.5 then meets {1.0, 0.1}, is below their median and stopped in both cases)
    assert steps == ({1.0: 3, 0.1: 3, 0.5: 1} if protect else {1.0: 3, 0.1: 1, 0.5: 1})


# --------------------------------------------------------------------------------------------
# a real multi-objective search of in-process trials; the picked config trains with pretrain

SAMPLES = 5


@pytest.fixture(scope="module")
def inprocess_search(ray_local, s3, small_catalogue, tmp_path_factory):
    from tuning.search import run_tune

    ov = tiny_overrides(small_catalogue, s3.url("runs"), "tune-mo")
    ov.update({
        "data.image_size": 32, "model.embed_dim": 16,
        "model.image.hf_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                                  "depths": [1, 1], "layer_type": "basic"},
        "model.text.hf_config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64},
        "loss.kind": "infonce", "loss.structure.in_modal": True, "train.workers": 2, "train.cpus_per_worker": 0.25,
        "data.preprocess_num_cpus": 0.5, "train.optim.warmup_steps": 0,
        "eval.specific_attributes": {"image": ["pattern", "size"], "text": ["care", "warranty"]},
        "tune.trial_kind": "in_process", "tune.trial_cpus": 1, "tune.samples": SAMPLES,
        "tune.trial_overrides": {"train.max_steps": 6, "train.eval_every": 3},
        "tune.objectives": [A, B], "tune.pick.margin": 0.005,
        # the pick on means over 2 fresh seeds of the baseline and the front's best probe (4 more runs)
        "tune.pick.confirm_seeds": 2, "tune.pick.confirm_candidates": 1,
        "tune.points_to_evaluate": [{}, {"loss.structure.lambda_sep": 0.5}],
        "tune.space": {"loss.structure.lambda_sep": {"kind": "loguniform", "low": 0.01, "high": 1.0, "zero": True},
                       "loss.structure.lambda_gc": {"kind": "loguniform", "low": 0.001, "high": 0.1, "zero": True}},
    })
    cfg = apply_overrides(GammarayConfig(), ov)
    out_dir = tmp_path_factory.mktemp("tune-mo-out")
    t0 = time.perf_counter()
    out = run_tune(cfg, progress=False, out_dir=str(out_dir))
    wall = time.perf_counter() - t0
    print(f"in-process multi-objective search: {len(out.rows)} trials in {wall:.1f} s\n{out.table}")
    return {"cfg": cfg, "out": out, "out_dir": out_dir, "wall": wall}


@pytest.mark.timeout(int(600 * TIME_FACTOR))
def test_multi_objective_search_of_in_process_trials_writes_the_front_and_the_pick(inprocess_search):
    from PIL import Image

    from pipelines import storage

    out = inprocess_search["out"]
    assert len(out.rows) == SAMPLES and not out.interrupted
    assert all(r.train_workers is None for r in out.rows)  # no TorchTrainer: the trial trained in its own process
    done = [r for r in out.rows if r.status == report.COMPLETED]
    assert done and all(r.steps == 6 and set(r.objectives) == {A, B} for r in done)
    for r in done:
        assert 0.0 <= r.objectives[A] <= 1.0 and 0.0 < r.objectives[B] <= 1.0
    # the baseline ({} = the base config: every weight 0) ran and completed; the seeded regularized point too
    assert out.baseline is not None and out.baseline.status == report.COMPLETED
    assert out.baseline.values["loss.structure.lambda_sep"] == 0.0
    assert any(r.values["loss.structure.lambda_sep"] == pytest.approx(0.5) for r in out.rows)
    # the front is what the objectives say
    assert [r.trial_id for r in out.front] == [r.trial_id for r in O.pareto_front(out.rows, [A, B])]
    # confirmation: the baseline and the front's highest-probe trial trained again with seeds 1 and 2
    from tuning import confirm as C

    conf = out.confirmation
    others = O.pareto_front([r for r in out.rows if not O.same_values(r.values, out.baseline.values)], [A, B])
    top = min(others, key=lambda r: (-r.objectives[B], r.trial_id))
    assert [c["trial_id"] for c in conf["configs"]] == [out.baseline.trial_id, top.trial_id]
    assert conf["seeds"] == [1, 2]
    for c in conf["configs"]:
        assert sorted(c["per_seed"]) == ["1", "2"] and all(set(v) == {A, B} for v in c["per_seed"].values())
    base_runs = conf["configs"][0]["per_seed"]
    assert base_runs["1"] != base_runs["2"]  # another seed, another run
    # ... and the pick follows the confirmed rule on those figures
    measured = [C.Confirmed(c["trial_id"], c["values"], {int(s): v for s, v in c["per_seed"].items()})
                for c in conf["configs"]]
    expect = C.pick(measured, measured[0], [A, B], margin_se=1.0, gain_se=1.0)
    assert out.picked.trial_id == expect.trial_id == conf["picked"] and out.pick_reason == expect.reason
    # 96 validation records cannot resolve a 0.005 drop of R@1 (at chance, 1/96, its binomial SE is 0.010)
    assert out.pick_warning == C.resolution_warning(measured[0].mean(A), 96, 0.005)
    assert measured[0].mean(A) == 0 or "96 records" in out.pick_warning
    text = (inprocess_search["out_dir"] / "confirm.txt").read_text()
    assert "mean ± se" in text and out.baseline.trial_id in text and f"* pick: {out.pick_reason}" in text
    csv_head = (inprocess_search["out_dir"] / "results.csv").read_text().splitlines()[0]
    assert f"{A}_mean" in csv_head and f"{B}_se" in csv_head
    # outputs: local and in the experiment (S3)
    doc = json.loads((inprocess_search["out_dir"] / "pareto_front.json").read_text())
    assert doc["objectives"] == [A, B] and doc["picked"] == out.picked.trial_id
    assert doc["rule"]["baseline"] == out.baseline.trial_id and doc["rung_metric"] == A
    assert {t["trial_id"] for t in doc["trials"]} == {r.trial_id for r in out.rows}
    assert sorted(doc["front"]) == sorted(r.trial_id for r in out.front)
    assert doc["confirmation"]["picked"] == out.picked.trial_id and doc["warning"] == out.pick_warning
    for name in ("pareto_front.json", "pareto_front.png", "picked_config.yaml", "baseline_config.yaml", "confirm.csv"):
        assert storage.exists(storage.join(out.experiment_uri, name)), name
    # the confirmation experiment beside the search's, with the points it trains (a resume checks them)
    assert storage.exists(storage.join(out.experiment_uri + "-confirm", "confirm.points"))
    img = Image.open(inprocess_search["out_dir"] / "pareto_front.png")
    assert img.size[0] > 500
    picked = load(out.picked_config_path)
    for path, value in out.picked.values.items():
        assert get_value(picked, path) == value, path
    assert picked.train.max_steps is None  # the trial-only budget is not carried into it
    head = open(out.picked_config_path).read().split("\n", 3)[:3]
    assert head[1].startswith("# confirmed over seeds [1, 2]: val_r_at_1=") and " ± " in head[1]
    baseline = load(out.baseline_config_path)
    assert baseline.loss.structure.lambda_sep == 0.0 and baseline.loss.structure.lambda_gc == 0.0


@pytest.mark.timeout(int(600 * TIME_FACTOR))
def test_picked_config_trains_with_pretrain(inprocess_search, tmp_path):
    from gammaray.app.cli import main

    path = inprocess_search["out"].picked_config_path
    summary = tmp_path / "pretrain.json"
    t0 = time.perf_counter()
    assert main(["pretrain", "--config", path, "--set", "train.epochs=1", "--quiet", "--json", str(summary)]) == 0
    print(f"picked config trained (1 epoch) in {time.perf_counter() - t0:.1f} s")
    m = json.loads(summary.read_text())
    assert m["final"] == 1 and m["epoch"] == 0
    assert m["samples_seen_total"] == 384  # one epoch of the catalogue, across 2 workers
    assert "val_probe_specific" in m and 0.0 < m["val_probe_specific"] <= 1.0  # the loop reports the objective
    assert m["checkpoint"].startswith("s3://") and "tune-mo-tune-picked" in m["checkpoint"]
