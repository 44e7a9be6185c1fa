"""Issue 22: a resume reads what its rank needs and nothing else. With an unchanged worker count a
rank opens its own loss-state shard only; after a change of count, the old shards that hold its
entries; the model export and other ranks' random streams are never copied to a worker."""

from __future__ import annotations

import json
import math
import os

import pyarrow.fs as pafs
import pytest
import torch

from workers.losses.state import _Store
from workers.training.checkpoint import local_checkpoint, loss_shard_ranks

pytestmark = pytest.mark.distributed


class _Shard(_Store):  # one rank's rate store without a process group
    def __init__(self, n: int, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        super().__init__(n, 1, "cpu")


class _Checkpoint:  # what restore needs of ray.train.Checkpoint: a pyarrow filesystem and a path
    def __init__(self, path: str):
        self.filesystem, self.path = pafs.LocalFileSystem(), path


def _checkpoint(root, world: int) -> str:
    d = root / "checkpoint_000001"
    for r in range(world):
        rd = d / f"rank-{r:05d}"
        rd.mkdir(parents=True)
        (rd / "train_state.json").write_text(json.dumps({"rank": r, "world_size": world}))
        for name in ("loss_state.pt", "rng.pt", "audit.pt", "quarantine.json"):
            (rd / name).write_bytes(b"x")
    (d / "deepspeed" / "state").mkdir(parents=True)
    (d / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (d / "model").mkdir()
    (d / "model" / "model.safetensors").write_bytes(b"x" * 1000)
    (d / "config.json").write_text("{}")
    (d / "portable.pt").write_bytes(b"x")
    return str(d)


def _copied(d: str) -> set[str]:
    return {os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs}


def test_a_resume_copies_only_what_its_rank_reads(tmp_path):
    path = _checkpoint(tmp_path, world=4)
    states = {f"rank-{r:05d}/train_state.json" for r in range(4)}
    with local_checkpoint(_Checkpoint(path), rank=2, W=4, copy=True) as d:  # same worker count
        assert _copied(d) == states | {"deepspeed/state/mp_rank_00_model_states.pt"} | {
            f"rank-00002/{n}" for n in ("loss_state.pt", "rng.pt", "audit.pt", "quarantine.json")}
    with local_checkpoint(_Checkpoint(path), rank=1, W=2, copy=True) as d:  # 4 -> 2: old ranks 1 and 3
        assert _copied(d) == states | {"deepspeed/state/mp_rank_00_model_states.pt", "portable.pt",
                                       "rank-00001/loss_state.pt", "rank-00003/loss_state.pt"}
    with local_checkpoint(_Checkpoint(path), rank=0, W=3, copy=True) as d:  # rank 0 gathers the totals
        got = _copied(d)
        assert {f"rank-{r:05d}/loss_state.pt" for r in range(4)} <= got
        assert {f"rank-{r:05d}/quarantine.json" for r in range(4)} <= got and not any("rng" in f for f in got)
        assert "config.json" not in got and not any(f.startswith("model/") for f in got)
    with local_checkpoint(_Checkpoint(path), rank=0, W=4) as d:  # a local checkpoint is read in place
        assert d == path


@pytest.mark.parametrize("old_w,new_w", [(2, 2), (4, 2), (2, 4), (2, 3), (6, 4), (3, 5)])
def test_the_loss_shards_a_rank_reads_hold_all_its_entries(old_w, new_w):
    """Re-sharding from only `loss_shard_ranks` gives every new rank exactly what loading every old
    shard gives (the entries of old shards left out belong to other ranks)."""
    n = 37
    values = torch.arange(n, dtype=torch.float32)
    old = []
    for r in range(old_w):
        t = _Shard(n, r, old_w)
        t.tables[0].copy_(values[r::old_w])
        old.append(t.state_dict())
    for rank in range(new_w):
        picked = loss_shard_ranks(old_w, new_w, rank)
        assert len(picked) == old_w // math.gcd(old_w, new_w)
        a, b = _Shard(n, rank, new_w), _Shard(n, rank, new_w)
        a.load_shards(old)
        b.load_shards(old[r] for r in picked)
        assert torch.equal(a.tables[0], b.tables[0]) and torch.equal(a.tables[0], values[rank::new_w])
    assert loss_shard_ranks(4, 4, 3) == [3]


def test_a_checkpoint_is_complete_only_when_every_listed_file_has_its_size(tmp_path):
    """Ray uploads a checkpoint folder in no set order: a full disk can leave every state file whole
    beside a truncated engine file. Each rank's train_state.json lists its files with their sizes, and
    only a folder whose files all have them is taken for a resume (an older folder without the list is
    judged by its state files alone)."""
    from workers.training.checkpoint import written_files
    from workers.training.resume import is_complete, newest_checkpoint
    from pipelines.storage import Store

    run = tmp_path / "run"
    for stamp, cut in (("2026-01-01_00-00-01", False), ("2026-01-01_00-00-02", True)):
        d = run / f"checkpoint_{stamp}"
        for r in range(2):
            (d / f"rank-{r:05d}").mkdir(parents=True)
            (d / f"rank-{r:05d}" / "loss_state.pt").write_bytes(b"x" * 100)
        (d / "deepspeed").mkdir()
        (d / "deepspeed" / "optim_states.pt").write_bytes(b"y" * 1000)
        files = written_files(str(d))
        assert files["deepspeed/optim_states.pt"] == 1000 and len(files) == 3
        for r in range(2):
            state = {"rank": r, "world_size": 2, "step": 1,
                     "files": {k: v for k, v in files.items() if not k.startswith("rank-") or k.startswith(f"rank-{r:05d}")}}
            (d / f"rank-{r:05d}" / "train_state.json").write_text(json.dumps(state))
        if cut:  # the upload stopped inside the engine file
            (d / "deepspeed" / "optim_states.pt").write_bytes(b"y" * 300)
    older, newer = sorted(str(p) for p in run.iterdir())
    assert is_complete(older, Store.of()) and not is_complete(newer, Store.of())
    assert newest_checkpoint(str(run), Store.of()) == older
    (tmp_path / "run" / os.path.basename(newer) / "deepspeed" / "optim_states.pt").write_bytes(b"y" * 1000)
    assert newest_checkpoint(str(run), Store.of()) == newer
