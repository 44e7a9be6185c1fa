"""ASHA whose rungs survive an interrupted experiment.

Ray Tune 2.60 restores the trials and the searcher of an interrupted experiment, but not the
scheduler: a resumed ASHA starts with empty rungs, so the trials that still have to run are no
longer compared with the ones that finished before the interruption (and weak ones are not
stopped). This subclass writes its state (the scheduler's own `save`) to the experiment folder
after every decision and loads it back the first time the resumed experiment touches it.
"""

from __future__ import annotations

import os
import tempfile

from ray.tune.schedulers import AsyncHyperBandScheduler

from gammaray.config import StorageConfig
from pipelines import storage

from .state_check import check_state_file

# not .pkl or .json: Tune copies those at the experiment root down on resume and back up at the end,
# which would put the state of the first run back over the resumed one
STATE_FILE = "asha_rungs.state"


class RungMemoryASHA(AsyncHyperBandScheduler):
    """`protect`: Tune params of trials that are recorded at the rungs but never stopped (the
    baseline a multi-objective pick compares with needs its final values)."""

    def __init__(self, state_uri: str, storage_cfg: StorageConfig, protect: list[dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._storage_cfg = storage_cfg
        self._state_loaded = False
        self._protect = list(protect or [])

    # -- persistence (AsyncHyperBandScheduler.save/restore pickle the scheduler's __dict__)

    def _load_once(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True
        if not storage.exists(self._state_uri, self._storage_cfg):
            return
        data = storage.read_bytes(self._state_uri, self._storage_cfg)
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
                storage.write_bytes(self._state_uri, f.read(), self._storage_cfg)

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
        self._persist()
        if action == self.STOP and any(_same_params(trial.config, p) for p in self._protect):
            return self.CONTINUE
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def on_trial_remove(self, tune_controller, trial):
        self._load_once()
        if trial.trial_id in self._trial_info:
            super().on_trial_remove(tune_controller, trial)
        self._persist()


def _same_params(config: dict, point: dict) -> bool:
    from .objectives import same_values

    return same_values({k: config.get(k) for k in point}, point)


def load_rung_records(state_uri: str, storage_cfg: StorageConfig) -> dict[float, dict[str, float]]:
    """The rung records a (finished or interrupted) experiment's ASHA holds."""
    s = RungMemoryASHA(state_uri, storage_cfg, time_attr="step", metric="m", mode="max", max_t=2, grace_period=1)
    s._load_once()
    return s.rung_records()
