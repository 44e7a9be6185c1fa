"""Checkpoint components (workers/training/stateful.py): each round-trips through
`state_dict`/`load_state_dict`, and `CheckpointManager` saves a mapping of them into the rank-folder
layout and restores it so that the next step is the one the saving run would have taken, bit for bit.
A mapping with a component missing or one the layout does not know is refused, naming it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from gammaray.schema import BatchKeys as K
from pipelines.storage import Store
from pipelines.stream import Segment
from workers.models.registry import build_model
from workers.training.audit import SampleAudit
from workers.training.checkpoint import CheckpointManager
from workers.training.engine import DDPEngine, EngineState, optimizer_and_schedule
from workers.training.objective import Objective
from workers.training.rng import ProcessRNG
from workers.training.state import TrainState, plan_of
from workers.training.stateful import Recut
from workers.training.step import train_step

pytestmark = pytest.mark.distributed
N = 24
IDENTITY = {"catalogue_sha256": "0" * 64, "catalogue_records": N, "run.seed": 0}


def _cfg() -> GammarayConfig:
    return apply_overrides(GammarayConfig(), {"data.image_size": 32, "data.max_text_tokens": 8, "data.batch_size": 4,
                                              "loss.kind": "gamma", "train.optim.warmup_steps": 1})


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {K.SAMPLE_INDEX: (torch.arange(4) + 4 * step) % N, K.PIXELS: torch.randn(4, 3, 32, 32, generator=g),
            K.INPUT_IDS: torch.randint(5, 200, (4, 8), generator=g), K.ATTENTION_MASK: torch.ones(4, 8, dtype=torch.long)}


def _components(cfg, seed: int) -> dict:
    torch.manual_seed(seed)  # the restoring side starts from other weights
    model = build_model(cfg.model, vocab_size=200, pad_token_id=0)
    opt, sched = optimizer_and_schedule(model, cfg, 10)
    return {"engine": EngineState(DDPEngine.local(model, opt, sched, cfg, "cpu"), sched, cfg),
            "objective": Objective(cfg.loss, num_samples=N, seed=0, distributed=False, batch_size=4),
            "train_state": TrainState(total_steps=10, plan=plan_of(cfg), identity=IDENTITY, num_records=N),
            "audit": SampleAudit(N), "rng": ProcessRNG()}


def _step(states: dict, step: int) -> None:
    train_step(states["engine"].engine, states["objective"], _batch(step), step / 10)
    states["audit"].add(_batch(step)[K.SAMPLE_INDEX].numpy())
    states["train_state"].step = step + 1


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):  # bit for bit; NaN (a sample never visited) equals NaN
        return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    return a == b if not hasattr(a, "shape") else bool((a == b).all())


def test_train_state_and_audit_round_trip_and_reshard():
    state = TrainState(epoch=1, step=7, total_steps=20, part=[Segment(3, 0, 10), Segment(5, 2, 6)], consumed=4,
                       records_trained=40, quarantine=[{"product_id": "p1", "reason": "bad image"}],
                       loss_sums={"records": 4, "sums": {"loss": 2.0}}, lockstep_left=2, plan={"epochs": 2})
    again = TrainState(plan={"epochs": 2})
    again.load_state_dict(json.loads(json.dumps(state.state_dict())))  # what the JSON files hold
    assert again.state_dict() == state.state_dict()
    assert again.part == [Segment(3, 4, 10), Segment(5, 2, 6)] and again.epoch_consumed_before == 4
    audit = SampleAudit(5)
    audit.add([0, 3, 3])
    other = SampleAudit(5)
    other.load_state_dict(audit.state_dict())
    assert other.counts.tolist() == [1, 0, 0, 2, 0]
    # two old ranks' positions re-cut for three: every unconsumed record once, totals on rank 0
    shards = [state.state_dict(), {**state.state_dict(), "position": {**state.state_dict()["position"],
                                                                     "remaining": [[9, 0, 5]]}}]
    cut = [TrainState() for _ in range(3)]
    for r, s in enumerate(cut):
        s.reshard([dict(x) if r == 0 else {"position": x["position"]} for x in shards], Recut(r, 3, 2, seed=1))
    assert sum(seg.size for s in cut for seg in s.part) == 6 + 4 + 5
    assert [s.records_trained for s in cut] == [80, 0, 0] and len(cut[0].quarantine) == 2 and not cut[1].quarantine
    merged = SampleAudit(5)
    merged.reshard([audit.state_dict(), other.state_dict()], Recut(0, 3, 2, seed=1))
    assert merged.counts.tolist() == [2, 0, 0, 4, 0]


def test_a_mapping_of_components_saves_and_resumes_exactly(tmp_path):
    cfg = _cfg()
    saving = _components(cfg, seed=0)
    _step(saving, 0)
    # the engine's own state dict round-trips into an engine that started elsewhere
    other = _components(cfg, seed=3)
    other["engine"].load_state_dict(saving["engine"].state_dict())
    assert _equal(other["engine"].state_dict(), saving["engine"].state_dict())
    other["objective"].load_state_dict(saving["objective"].state_dict())
    assert _equal(other["objective"].state_dict(), saving["objective"].state_dict())

    CheckpointManager(saving, cfg, Store.of(), in_ray=False).write(str(tmp_path), export=False)
    assert sorted(os.listdir(tmp_path / "rank-00000")) == ["audit.pt", "loss_state.pt", "quarantine.json", "rng.pt",
                                                           "train_state.json"]
    index = json.loads((tmp_path / "rank-00000" / "train_state.json").read_text())
    assert list(index)[:3] == ["rank", "world_size", "epoch"] and "deepspeed/state/ddp_state.pt" in index["files"]
    _step(saving, 1)  # what the run does next
    after = {k: saving[k].state_dict() for k in ("engine", "objective", "audit")}
    draw = torch.rand(3)

    resumed = _components(cfg, seed=5)
    CheckpointManager(resumed, cfg, Store.of(), in_ray=False).restore_folder(str(tmp_path))
    assert resumed["train_state"].step == 1 and resumed["train_state"].resumes[-1]["optimizer"] == "exact"
    _step(resumed, 1)
    for key, want in after.items():
        assert _equal(resumed[key].state_dict(), want), key
    assert torch.equal(torch.rand(3), draw)  # the random streams went on where they were saved

    # a checkpoint without a required file names it
    os.remove(tmp_path / "rank-00000" / "loss_state.pt")
    with pytest.raises(RuntimeError, match="incomplete checkpoint, no rank-00000/loss_state.pt"):
        CheckpointManager(other, cfg, Store.of(), in_ray=False).restore_folder(str(tmp_path))


def test_a_mapping_with_a_missing_or_unknown_component_is_refused():
    cfg = _cfg()
    states = {k: ProcessRNG() for k in ("engine", "objective", "train_state", "audit", "rng")}  # only the keys count here
    with pytest.raises(ValueError, match=r"\['rng'\] missing"):
        CheckpointManager({k: v for k, v in states.items() if k != "rng"}, cfg, Store.of())
    with pytest.raises(ValueError, match=r"unknown checkpoint component\(s\) \['optimizer'\]"):
        CheckpointManager({**states, "optimizer": states["engine"]}, cfg, Store.of())
    CheckpointManager({**states, "audit": None}, cfg, Store.of())  # train.audit_samples off: the one that may be left out


class _Stop(Exception):
    pass


@pytest.mark.parametrize("mode", ["mean", "sample"])
def test_heads_training_stopped_after_an_epoch_resumes_to_the_same_weights(tmp_path, mode):
    """Heads on cached features (workers/training/heads.py) save their state every epoch; a run stopped
    in its second epoch and rerun ends with the weights of the uninterrupted run, bit for bit. The
    gamma memory must come back for that (a resume that lost it, as before 2026-12-07, trains on other
    rates), and in mode=sample its random generator too."""
    import numpy as np

    from workers.evaluation.features import FeatureSet
    from workers.training.heads import train_heads

    rng = np.random.default_rng(0)
    n = 64
    feats = FeatureSet("memory", np.arange(n), rng.standard_normal((n, 24)).astype(np.float32),
                       rng.standard_normal((n, 20)).astype(np.float32), ["a", "b"] * (n // 2))
    cfg = apply_overrides(GammarayConfig(), {
        "model.image.locked": True, "model.text.locked": True, "model.embed_dim": 16, "data.batch_size": 16,
        "train.epochs": 3, "loss.kind": "gamma", "loss.gamma.mode": mode, "run.deterministic": True})
    whole = train_heads(cfg, feats, diagnostics=False)

    def stop_in_epoch_two(m: dict) -> None:
        if m["epoch"] == 1:
            raise _Stop

    state = str(tmp_path / "heads_state.pt")
    with pytest.raises(_Stop):
        train_heads(cfg, feats, diagnostics=False, state_uri=state, store=Store.of(), report=stop_in_epoch_two)
    resumed = train_heads(cfg, feats, diagnostics=False, state_uri=state, store=Store.of())
    assert resumed.resumed_from_epoch == 1 and resumed.steps == whole.steps == 3 * 4
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
