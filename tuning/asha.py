"""ASHA whose rungs survive an interrupted experiment.

Ray Tune 2.60 restores the trials and the searcher of an interrupted experiment, but not the
scheduler: a resumed ASHA starts with empty rungs, so the trials that still have to run are no
longer compared with the ones that finished before the interruption (and weak ones are not
stopped). This subclass writes its state (the scheduler's own `save`) to the experiment folder
after every decision and loads it back the first time the resumed experiment touches it.

Two more things a search of regularizer weights needs (a term such as lambda_sep changes what the
embedding keeps only after a good part of the run, while its R@1 early on differs from plain's by
noise):
- the grace period as a fraction of the run (`grace_steps`: tune.asha.grace_fraction, 0.5 by default
  when the space holds a loss.structure weight), so the first rung comes after the terms have acted;
- with two objectives (`front_objective`), a trial ASHA would stop on tune.metric at a rung continues
  when its (metric, second objective) pair is on the Pareto front of the pairs recorded at that rung.
"""

from __future__ import annotations

import math
import os
import tempfile

from ray.tune.schedulers import AsyncHyperBandScheduler

from gammaray.config import StorageConfig
from pipelines.storage import Store

from .state_check import check_state_file

# not .pkl or .json: Tune copies those at the experiment root down on resume and back up at the end,
# which would put the state of the first run back over the resumed one
STATE_FILE = "asha_rungs.state"


REGULARIZER_PREFIX = "loss.structure."
DEFAULT_REGULARIZER_GRACE = 0.5


def grace_steps(grace_period: int | None, grace_fraction: float | None, eval_every: int, budget: int,
                space_paths: list[str]) -> int:
    """ASHA's grace period in optimizer steps: tune.asha.grace_period if set; else grace_fraction of
    the budget (0.5 for a search of loss.structure weights when unset) rounded up to a multiple of
    eval_every (a rung between two validations would compare stale values); else eval_every."""
    every = max(1, int(eval_every or 1))
    if grace_period:
        return int(grace_period)
    if grace_fraction is None and any(p.startswith(REGULARIZER_PREFIX) for p in space_paths):
        grace_fraction = DEFAULT_REGULARIZER_GRACE
    if grace_fraction is None:
        return every
    return max(every, every * math.ceil(grace_fraction * budget / every - 1e-9))


def on_pair_front(pairs: dict[str, tuple[float, float]], trial_id: str) -> bool:
    """Whether trial_id's (a, b) is not dominated (>= on both, > on one) by another trial's pair."""
    a, b = pairs[trial_id]
    return not any(x >= a and y >= b and (x > a or y > b) for t, (x, y) in pairs.items() if t != trial_id)


class RungMemoryASHA(AsyncHyperBandScheduler):
    """`protect`: Tune params of trials that are recorded at the rungs but never stopped (the
    baseline a multi-objective pick compares with needs its final values). `front_objective`: the
    second objective of a two-objective search; a trial on the front of the (metric, front_objective)
    pairs recorded at a rung is kept."""

    def __init__(self, state_uri: str, store: Store | StorageConfig, protect: list[dict] | None = None,
                 front_objective: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._store = Store.of(store)
        self._state_loaded = False
        self._protect = list(protect or [])
        self._front_objective = front_objective
        self._rung_pairs: dict[float, dict[str, tuple[float, float]]] = {}  # saved with the rest of __dict__
        self.kept_on_front: list[tuple[str, float]] = []                     # (trial_id, milestone)

    # -- persistence (AsyncHyperBandScheduler.save/restore pickle the scheduler's __dict__)

    def _load_once(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True
        if not self._store.exists(self._state_uri):
            return
        data = self._store.read_bytes(self._state_uri)
        check_state_file(data, self._state_uri)  # a pickle from storage: checked before it is loaded
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, STATE_FILE)
            with open(path, "wb") as f:
                f.write(data)
            self.restore(path)
        self._state_loaded = True

    def _persist(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, STATE_FILE)
            self.save(path)
            with open(path, "rb") as f:
                self._store.write_bytes(self._state_uri, f.read())

    def rung_records(self) -> dict[float, dict[str, float]]:
        """{milestone step: {trial_id: metric}} over all brackets (for reports and tests)."""
        out: dict[float, dict[str, float]] = {}
        for bracket in self._brackets:
            for milestone, recorded in bracket._rungs:
                out.setdefault(milestone, {}).update(recorded)
        return out

    # -- the scheduler hooks: load before the first decision, save after every decision

    def on_trial_add(self, tune_controller, trial):
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        new_rungs = self._record_pairs(trial.trial_id, result)
        if action == self.STOP and self._front_objective:
            kept = [m for m in new_rungs if on_pair_front(self._rung_pairs[m], trial.trial_id)]
            if kept:
                self.kept_on_front.append((trial.trial_id, max(kept)))
                action = self.CONTINUE
        self._persist()
        if action == self.STOP and any(_same_params(trial.config, p) for p in self._protect):
            return self.CONTINUE
        return action

    def _record_pairs(self, trial_id: str, result: dict) -> list[float]:
        """The rungs this result just recorded the trial at (with its two objectives, when both are finite)."""
        if not self._front_objective:
            return []
        a, b = result.get(self._metric), result.get(self._front_objective)
        if not (_finite(a) and _finite(b)):
            return []
        new = []
        for milestone, recorded in self.rung_records().items():
            pairs = self._rung_pairs.setdefault(milestone, {})
            if trial_id in recorded and trial_id not in pairs:
                pairs[trial_id] = (float(a), float(b))
                new.append(milestone)
        return new

    def on_trial_complete(self, tune_controller, trial, result):
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def on_trial_remove(self, tune_controller, trial):
        self._load_once()
        if trial.trial_id in self._trial_info:
            super().on_trial_remove(tune_controller, trial)
        self._persist()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _same_params(config: dict, point: dict) -> bool:
    from .objectives import same_values

    return same_values({k: config.get(k) for k in point}, point)


def load_rung_records(state_uri: str, store: Store | StorageConfig) -> dict[float, dict[str, float]]:
    """The rung records a (finished or interrupted) experiment's ASHA holds."""
    s = RungMemoryASHA(state_uri, store, time_attr="step", metric="m", mode="max", max_t=2, grace_period=1)
    s._load_once()
    return s.rung_records()
