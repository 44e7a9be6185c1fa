"""Selection that knows its noise (tuning/confirm.py) and a scheduler that lets slow-acting terms act
(tuning/asha.py): the confirmed pick rule on hand-made per-seed values, the resolution warning, the
confirmation points and their matching, ASHA's grace period as a fraction of the run and the rung
that keeps a trial on the front of its two objectives. No Ray runtime: the rules are pure; the
confirmation experiment itself runs in tests/test_tune_objectives.py's in-process search."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from gammaray.config import ConfigError, GammarayConfig, apply_overrides, load
from tuning import confirm as C, report, space

pytestmark = pytest.mark.tune

A, B = "val_r_at_1", "val_probe_specific"
SEP = "loss.structure.lambda_sep"


def confirmed(tid: str, a: list[float], b: list[float], **values) -> C.Confirmed:
    return C.Confirmed(tid, values, {s + 1: {A: x, B: y} for s, (x, y) in enumerate(zip(a, b))})


def test_standard_error_is_the_sample_std_over_seeds_over_sqrt_n():
    c = confirmed("x", [1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    assert c.mean(A) == pytest.approx(2.0) and c.se(A) == pytest.approx(1 / math.sqrt(3))
    assert c.se(B) == 0.0 and c.n(A) == 3
    assert math.isnan(confirmed("one", [0.1], [0.2]).se(A))  # one seed: no spread
    # a run that reported no finite value does not count
    c.per_seed[4] = {A: float("nan")}
    assert c.n(A) == 3 and c.mean(A) == pytest.approx(2.0)


# the committed study's situation, in numbers: plain; a lambda_sep that pays on the probe at no real
# cost in R@1; a lambda_gc whose single run looked good (noise); a strong term that costs R@1; a trial
# whose confirmation runs failed
BASE = confirmed("base", [0.088, 0.092, 0.084], [0.776, 0.774, 0.775])
SEP_OK = confirmed("sep", [0.085, 0.091, 0.086], [0.800, 0.806, 0.795], **{SEP: 0.3})
GC_NOISE = confirmed("gc", [0.090, 0.087, 0.089], [0.779, 0.770, 0.777])
STRONG = confirmed("strong", [0.060, 0.062, 0.058], [0.850, 0.860, 0.855])
BROKEN = confirmed("broken", [0.2], [0.99])


def test_confirmed_pick_keeps_r_at_1_in_standard_errors_and_needs_a_gain_beyond_the_noise():
    cands = [BASE, SEP_OK, GC_NOISE, STRONG, BROKEN]
    p = C.pick(cands, BASE, [A, B], margin_se=1.0, gain_se=1.0)
    assert p.trial_id == "sep"
    d = {x.trial_id: x for x in p.decisions}
    assert set(d) == {"sep", "gc", "strong", "broken"}             # the baseline is not its own candidate
    assert d["sep"].qualifies and d["sep"].gains
    assert d["sep"].d_a == pytest.approx(SEP_OK.mean(A) - BASE.mean(A))
    assert d["sep"].se_a == pytest.approx(math.hypot(SEP_OK.se(A), BASE.se(A)))
    assert d["gc"].qualifies and not d["gc"].gains                  # its probe gain is inside the noise
    assert not d["strong"].qualifies and d["strong"].gains          # pays on the probe, loses R@1
    assert not d["broken"].qualifies                                # one run: no spread, not comparable
    assert "highest mean val_probe_specific" in p.reason and "over 3 seeds" in p.reason
    # deterministic: the order the candidates come in changes nothing
    shuffled = cands[:]
    random.Random(3).shuffle(shuffled)
    assert C.pick(shuffled, BASE, [A, B], 1.0, 1.0).trial_id == "sep"
    # a stricter R@1 rule (no drop of the mean at all) leaves sep out: nothing else pays, the baseline
    p0 = C.pick(cands, BASE, [A, B], margin_se=0.0, gain_se=1.0)
    assert p0.trial_id == "base" and "the baseline" in p0.reason
    # a looser one admits the strong term, whose probe mean is the highest
    assert C.pick(cands, BASE, [A, B], margin_se=20.0, gain_se=1.0).trial_id == "strong"
    # no baseline runs: no pick, and the reason says why
    p = C.pick(cands, confirmed("base", [0.09], [0.77]), [A, B], 1.0, 1.0)
    assert p.trial_id is None and "needs 2" in p.reason
    assert C.pick(cands, None, [A, B], 1.0, 1.0).trial_id is None


def test_ties_go_to_the_higher_mean_r_at_1_then_the_trial_id():
    twin = confirmed("sep2", [0.090, 0.093, 0.088], [0.800, 0.806, 0.795])
    assert C.pick([BASE, SEP_OK, twin], BASE, [A, B], 1.0, 1.0).trial_id == "sep2"
    same = confirmed("a-sep", [0.085, 0.091, 0.086], [0.800, 0.806, 0.795])
    assert C.pick([BASE, SEP_OK, same], BASE, [A, B], 1.0, 1.0).trial_id == "sep"


def test_a_single_run_rule_on_the_first_seed_picks_the_noise_the_confirmed_rule_rejects():
    """Why the confirmation exists: on seed 1 alone, gc looks better than sep on R@1 and inside the
    0.005 margin; sep is 0.003 below plain there. Over 3 seeds gc's probe gain is noise."""
    from tuning import objectives as O

    def first(c):
        return report.TrialRow(c.trial_id, c.values, c.per_seed[1][A], 10, report.COMPLETED,
                               objectives=dict(c.per_seed[1]))

    rows = [first(c) for c in (BASE, GC_NOISE)]
    assert O.pick(rows, [A, B], rows[0], margin=0.005).row.trial_id == "gc"
    assert C.pick([BASE, GC_NOISE], BASE, [A, B], 1.0, 1.0).trial_id == "base"


def test_resolution_warning_compares_the_binomial_se_of_r_at_1_with_the_margin():
    w = C.resolution_warning(0.088, 500, 0.005)
    se = math.sqrt(0.088 * 0.912 / 500)
    assert w is not None and "500 records" in w and f"{se:.4f}" in w and "3211 records" in w
    assert C.resolution_warning(0.088, 4000, 0.005) is None
    assert C.resolution_warning(None, 500, 0.005) is None and C.resolution_warning(0.1, None, 0.005) is None


def test_confirmation_points_give_back_the_trials_values_with_each_seed():
    cfg = apply_overrides(GammarayConfig(), {
        "run.seed": 5, "tune.name": "exp",
        "tune.space": {SEP: {"kind": "loguniform", "low": 0.1, "high": 1.0, "zero": True},
                       "model.temperature": {"kind": "choice", "values": [0.05, 0.1]}}})
    base = report.TrialRow("b", {SEP: 0.0, "model.temperature": 0.05}, 0.1, 4, report.COMPLETED)
    sep = report.TrialRow("s", {SEP: 0.3, "model.temperature": 0.1}, 0.1, 4, report.COMPLETED)
    seeds = C.seeds(cfg, 3)
    assert seeds == [6, 7, 8]  # fresh: the search ran with run.seed
    ccfg = C.confirm_config(cfg, seeds)
    assert ccfg.tune.name == "exp-confirm" and ccfg.tune.space[C.SEED_KEY].values == seeds
    pts = C.points([base, sep], cfg, seeds)
    assert len(pts) == 6
    for p in pts:  # every point is a valid trial config, with the seed applied
        vals = space.effective(p, ccfg.tune.space)
        trial = space.trial_config(ccfg, vals)
        assert trial.run.seed == p[C.SEED_KEY]
        assert {k: v for k, v in vals.items() if k != C.SEED_KEY} in (base.values, sep.values)
    assert pts[0][SEP + space.ZERO_SUFFIX] is True and pts[3][SEP] == 0.3
    # the runs come back as rows of the confirmation experiment: matched on the values without the seed
    runs = [report.TrialRow(f"r{i}", space.effective(p, ccfg.tune.space), 0.1, 4, report.COMPLETED,
                            objectives={A: 0.1 + i / 100, B: 0.7}) for i, p in enumerate(pts)]
    runs[5].status = report.ERROR
    got = {c.trial_id: c for c in C.gather([base, sep], runs, [A, B])}
    assert sorted(got["b"].per_seed) == [6, 7, 8] and got["b"].mean(A) == pytest.approx(0.11)
    assert sorted(got["s"].per_seed) == [6, 7]  # the failed run is not a measurement


def test_candidates_are_the_baseline_and_the_front_of_the_other_trials():
    def trial(t, v, a, b, status=report.COMPLETED):
        return report.TrialRow(t, {SEP: v}, a, 4, status, objectives={A: a, B: b})

    base = trial("b", 0.0, 0.09, 0.78)
    front = [trial("x", 0.2, 0.07, 0.9), trial("y", 0.3, 0.08, 0.8), trial("z", 0.4, 0.085, 0.75)]
    dominated, stopped = trial("d", 0.5, 0.06, 0.7), trial("s", 0.6, 0.2, 0.99, report.STOPPED)
    got = C.candidates([*front, base, dominated, stopped], base, [A, B], limit=2)
    assert [r.trial_id for r in got] == ["b", "x", "y"]  # the highest second objective first
    # z is dominated by the baseline's single run, not by another regularized trial: still a candidate
    # (one lucky baseline run must not hide it); a trial with the baseline's values (the searcher
    # proposed plain again) is the baseline, not a candidate
    again = trial("b2", 0.0, 0.095, 0.80)
    assert [r.trial_id for r in C.candidates([again, base, *front], base, [A, B], 5)] == ["b", "x", "y", "z"]


def test_confirm_seeds_is_documented_and_one_seed_is_refused():
    with pytest.raises(ConfigError, match="confirm_seeds=1 measures no spread"):
        apply_overrides(GammarayConfig(), {"tune.pick.confirm_seeds": 1})
    assert GammarayConfig().tune.pick.confirm_seeds == 3
    with open("docs/config-reference.md") as f:
        ref = f.read()
    for key in ("tune.pick.confirm_seeds", "tune.pick.margin_se", "tune.pick.gain_se", "tune.asha.grace_fraction",
                "tune.asha.keep_front"):
        assert f"`{key}`" in ref, key


# --------------------------------------------------------------------------------------------
# the scheduler


def test_grace_period_is_a_fraction_of_the_run_for_regularizer_searches():
    from tuning.asha import grace_steps

    reg, other = [SEP, "model.temperature"], ["model.temperature"]
    assert grace_steps(None, None, 94, 752, reg) == 376          # default half the run, a multiple of eval_every
    assert grace_steps(None, None, 94, 752, other) == 94         # not a regularizer search: the first validation
    assert grace_steps(None, 0.6, 94, 752, other) == 470         # 451.2 rounded up to the next validation
    assert grace_steps(188, 0.6, 94, 752, reg) == 188            # an explicit grace_period wins
    assert grace_steps(None, 0.01, 94, 752, reg) == 94           # never before the first validation
    assert grace_steps(None, 0.5, 2, 3, reg) == 2


def test_the_structure_search_lets_the_terms_act_and_searches_where_lambda_sep_pays():
    from tuning.asha import grace_steps

    cfg = load("configs/tune-structure.yaml")
    dims = cfg.tune.space
    assert dims[SEP].low >= 0.1 and dims[SEP].high >= 1.0 and dims[SEP].zero
    assert GammarayConfig().tune.space[SEP].low == 0.1
    budget = 4 * math.ceil(3000 / 16)
    trial = space.trial_config(cfg, {})
    grace = grace_steps(cfg.tune.asha.grace_period, cfg.tune.asha.grace_fraction, trial.train.eval_every, budget,
                        list(dims))
    assert grace >= budget / 2 and cfg.tune.pick.confirm_seeds >= 3


def _asha(tmp_path, front: str | None):
    from gammaray.config import StorageConfig
    from tuning.asha import STATE_FILE, RungMemoryASHA

    return RungMemoryASHA(str(tmp_path / STATE_FILE), StorageConfig(), front_objective=front, time_attr="step",
                          metric=A, mode="max", max_t=9, grace_period=4, reduction_factor=2, stop_last_trials=False)


@pytest.mark.parametrize("keep_front", [True, False])
def test_asha_keeps_a_trial_on_the_front_of_both_objectives_at_a_rung(tmp_path, keep_front):
    sched = _asha(tmp_path, B if keep_front else None)
    trials = {t: SimpleNamespace(trial_id=t, config={}) for t in ("plain", "strong", "reg", "weak")}
    for t in trials.values():
        sched.on_trial_add(None, t)

    def at_rung(t, a, b):
        return sched.on_trial_result(None, trials[t], {"step": 4, A: a, B: b})

    assert at_rung("plain", 0.09, 0.70) == sched.CONTINUE            # first at the rung
    assert at_rung("strong", 0.10, 0.71) == sched.CONTINUE           # above the median
    # behind on R@1 (ASHA alone stops it) but the best probe at the rung: on the front, kept
    assert at_rung("reg", 0.08, 0.80) == (sched.CONTINUE if keep_front else sched.STOP)
    # behind on both: stopped either way
    assert at_rung("weak", 0.07, 0.69) == sched.STOP
    assert sched.kept_on_front == ([("reg", 4.0)] if keep_front else [])
    # the pairs survive a restart with the rest of the scheduler's state
    again = _asha(tmp_path, B)
    again._load_once()
    assert set(again._rung_pairs.get(4.0, {})) == ({"plain", "strong", "reg", "weak"} if keep_front else set())


def test_the_state_check_accepts_a_multi_objective_tpe_past_its_random_start():
    """TPE sets its gamma function on its first model-based sample (after 10 random trials), in
    multi-objective mode optuna's default_gamma_multiobjective: a 16-trial two-objective search's
    searcher state holds it, and the check after the search refused it until it was allowlisted."""
    import pickle

    import optuna

    from tuning.state_check import check_state_file

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.NopPruner())  # as Ray Tune's OptunaSearch makes it
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), -t.suggest_float("y", 0, 1)), n_trials=12)
    assert study.sampler._gamma is optuna.samplers._tpe.sampler.default_gamma_multiobjective
    check_state_file(pickle.dumps(study), "searcher-state.pkl")


def test_a_resumed_confirmation_refuses_other_candidates(tmp_path):
    from pipelines.storage import Store

    uri, sc = str(tmp_path / "exp-confirm"), Store.of()
    pts = [{SEP: 0.3, SEP + space.ZERO_SUFFIX: False, C.SEED_KEY: s} for s in (1, 2)]
    C.check_points(uri, pts, sc)  # nothing stored yet (an experiment started before the file existed)
    C.write_points(uri, pts, sc)
    C.check_points(uri, [dict(p) for p in pts], sc)
    with pytest.raises(ConfigError, match="exp-confirm was started with other candidates"):
        C.check_points(uri, [*pts, {SEP: 0.5, SEP + space.ZERO_SUFFIX: False, C.SEED_KEY: 1}], sc)
