"""Checkpoints: every rank saves its engine state, its shard of the loss state, its data position, RNG
streams and quarantine into one folder that Ray merges; `restore` reads such a folder on any worker
count (re-cutting the remaining records and re-sharding the loss state when the count changed)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Iterator

import ray.train
import torch

from gammaray.config import GammarayConfig
from pipelines import storage
from pipelines.stream import part_from_json, reshard, total_rows
from pipelines.tokenizer import load as load_tokenizer, tokenizer_uri
from workers.models.registry import save_model
from workers.runtime import rank_dir, RANK_DIR_PREFIX, run_dir, sync_buffers
from workers.safe_load import check_no_links, load as load_data
from workers.training.audit import SampleAudit
from workers.training.engine import PORTABLE_FILE, is_zero3, load_state, save_state, set_total_steps
from workers.training.objective import Objective
from workers.training.quarantine import write_quarantine
from workers.training.resume import check_identity
from workers.training.rng import reseed, rng_state, set_rng_state
from workers.training.state import TrainState, merge_loss_sums, plan_of, read_position, rank_folders, remaining_steps


def latest_checkpoint(cfg: GammarayConfig, in_ray: bool):
    """[ray] The run's latest checkpoint, else train.resume_from, else None."""
    ckpt = ray.train.get_checkpoint() if in_ray else None
    if ckpt is None and cfg.train.resume_from:
        fs, path = storage.resolve(cfg.train.resume_from, cfg.storage)
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    return ckpt


def checkpoint_uri(ckpt) -> str:
    """A Ray checkpoint's location as a URI (for messages)."""
    return ("s3://" if "s3" in ckpt.filesystem.type_name else "") + ckpt.path


def save_and_report(engine, scheduler, objective: Objective, audit: SampleAudit | None, state: TrainState,
                    cfg: GammarayConfig, metrics: dict, rank: int, W: int, in_ray: bool, final: bool = False) -> None:
    """Every rank writes its part of one checkpoint folder; Ray merges the ranks' folders."""
    sync_buffers(engine)  # [dist] one set of BatchNorm statistics in the checkpoint and the export
    with tempfile.TemporaryDirectory(prefix="gammaray-ckpt-") as d:
        save_state(engine, scheduler, d, cfg.train.portable_checkpoint)          # [ds] every rank
        rdir = os.path.join(d, rank_dir(rank))
        os.makedirs(rdir)
        torch.save(objective.state_dict(), os.path.join(rdir, "loss_state.pt"))
        torch.save(rng_state(), os.path.join(rdir, "rng.pt"))
        if audit is not None:
            torch.save(audit.counts, os.path.join(rdir, "audit.pt"))
        with open(os.path.join(rdir, "quarantine.json"), "w") as f:
            json.dump(state.quarantine, f)
        write_quarantine(state, cfg, rank)
        if rank == 0:
            export_model(engine, cfg, os.path.join(d, "model"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg.model_dump(mode="json"), f, indent=1)
        else:
            export_model(engine, cfg, None)  # ZeRO-3 gathers are collective
        # last, with the size of every file this rank wrote: Ray uploads the folder in no set order, so
        # a save cut short (a full disk) can leave this file whole beside a truncated engine file, and
        # the sizes are what tells a complete checkpoint (workers/training/resume.py is_complete)
        position = {**state.position_json(rank, W), "files": written_files(d)}
        with open(os.path.join(rdir, "train_state.json"), "w") as f:
            json.dump(position, f)
        if in_ray:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))  # [ray]
        else:
            local = os.path.join(storage.join(run_dir(cfg), "local-checkpoint"))
            if final and not storage.is_remote(local):
                shutil.rmtree(local, ignore_errors=True)
                shutil.copytree(d, local)


def written_files(d: str) -> dict[str, int]:
    """{path relative to d: size in bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, d).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def export_model(engine, cfg: GammarayConfig, out_dir: str | None) -> None:
    """Towers in Hugging Face format plus the heads; under ZeRO-3 the weights are gathered first
    (every rank must call this)."""
    model = engine.module
    if is_zero3(engine):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if out_dir is not None:
                save_model(model, out_dir, cfg.model, load_tokenizer(tokenizer_uri(cfg), storage.S3Settings.from_config(cfg.storage)))
        return
    if out_dir is not None:
        save_model(model, out_dir, cfg.model, load_tokenizer(tokenizer_uri(cfg), storage.S3Settings.from_config(cfg.storage)))


def loss_shard_ranks(old_W: int, W: int, rank: int) -> list[int]:
    """The old ranks whose loss-state shards hold entries of `rank` in a world of W: sample i lives in
    old shard i mod old_W and belongs to new rank i mod W, so only the old ranks congruent to `rank`
    modulo gcd(old_W, W) (one rank when the count is unchanged: its own)."""
    g = math.gcd(old_W, W)
    return [r for r in range(old_W) if r % g == rank % g]


def files_needed(rel: str, rank: int, W: int, old_W: int) -> bool:
    """Whether this rank's restore reads the checkpoint file `rel` (a path relative to the folder).
    The model export (`model/`, config.json) is for users, not for resuming; a rank folder's files
    other than the small train_state.json are read by the ranks that own their contents."""
    top, _, rest = rel.partition("/")
    if top == "deepspeed":
        return True  # the engine's own files: DeepSpeed opens what it needs of them
    if rel == PORTABLE_FILE:
        return old_W != W
    if not top.startswith(RANK_DIR_PREFIX) or not rest:
        return False
    r = int(top[len(RANK_DIR_PREFIX):])
    if rest == "train_state.json":
        return True
    if old_W == W:
        return r == rank
    if rest == "loss_state.pt":
        return r in loss_shard_ranks(old_W, W, rank)
    return rank == 0 and rest in ("quarantine.json", "audit.pt")


@contextlib.contextmanager
def local_checkpoint(ckpt, rank: int, W: int, copy: bool | None = None) -> Iterator[str]:
    """A local folder with the files of checkpoint `ckpt` that this rank's restore reads: the folder
    itself on a local filesystem, else a temporary copy of those files only (Ray's
    `as_directory()` would copy all of them, every rank's loss shard and the model export included,
    to every node). `copy=True` forces the copy (tests)."""
    import pyarrow.fs as pafs

    fs, root = ckpt.filesystem, ckpt.path.rstrip("/")
    if copy is None:
        copy = not isinstance(fs, pafs.LocalFileSystem)
    if not copy:
        yield root
        return
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rels = sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)
    with tempfile.TemporaryDirectory(prefix="gammaray-restore-") as d:

        def fetch(rel: str) -> None:
            os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
            with fs.open_input_stream(f"{root}/{rel}") as src, open(os.path.join(d, rel), "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)

        fetch(f"{rank_dir(0)}/train_state.json")  # says the world size the checkpoint was saved with
        old_W = int(read_position(d, 0)["world_size"])
        for rel in rels:
            if rel != f"{rank_dir(0)}/train_state.json" and files_needed(rel, rank, W, old_W):
                fetch(rel)
        for rel in rels:  # every rank's folder, for the completeness check
            if rel.startswith(RANK_DIR_PREFIX) and "/" in rel:
                os.makedirs(os.path.join(d, rel.split("/", 1)[0]), exist_ok=True)
        yield d


def restore(d: str, engine, scheduler, objective: Objective, audit: SampleAudit | None, cfg: GammarayConfig,
            units, rank: int, W: int, identity: dict, shown: str) -> TrainState:
    """Every rank, from one checkpoint folder saved with any worker count. `shown` names the
    checkpoint in errors: a file that would run code (workers/safe_load.py) or a checkpoint trained
    under other data, seed or plan settings (workers/training/resume.py) is refused."""
    check_no_links(d, shown)  # links could hand DeepSpeed (which follows them) files no check has seen
    first = read_position(d, 0)
    forced = check_identity(first.get("identity"), identity, cfg, shown)
    old_W = first["world_size"]
    same_world = old_W == W
    folders = rank_folders(d)
    if folders != list(range(old_W)):
        raise RuntimeError(f"{shown}: incomplete checkpoint, rank folders {folders} of {old_W}")
    mine = read_position(d, rank) if same_world else first
    # every rank's position (all parts) only where they are needed: a re-cut, or a re-planned schedule
    replan = not (same_world and mine.get("plan") == plan_of(cfg) and mine.get("total_steps"))
    positions = [read_position(d, r) for r in range(old_W)] if (replan or not same_world) else None
    how = load_state(engine, scheduler, d, same_world, shown)                   # [ds]

    def rank_file(r: int, name: str) -> tuple[str, str]:
        return os.path.join(d, rank_dir(r), name), f"{shown}/{rank_dir(r)}/{name}"

    # the per-sample memory, re-sharded for W ranks; a generator reads one old shard at a time, so
    # peak memory stays at this rank's part plus one old shard (and the E-step generator comes back)
    # only the old shards holding entries of this rank are read: its own one when the count is unchanged
    objective.load_shards(load_data(*rank_file(r, "loss_state.pt")) for r in loss_shard_ranks(old_W, W, rank))
    step = mine["step"]
    state = TrainState(epoch=mine["epoch"], step=step, records_trained=mine["records_trained"],
                       best_val_r_at_1=mine["best_val_r_at_1"], last_val=mine.get("last_val", {}),
                       resumes=list(mine.get("resumes", [])), audit=list(mine.get("audit", [])), plan=plan_of(cfg),
                       identity=identity, loss_sums=mine.get("loss_sums", {}), loss_sums_prev=mine.get("loss_sums_prev", {}))
    if same_world:
        parts = [part_from_json(p["remaining"] or []) for p in positions] if positions else None
        state.part = None if mine["remaining"] is None else part_from_json(mine["remaining"])
        state.epoch_consumed_before = mine["epoch_consumed"]
        state.lockstep_left = mine.get("lockstep_left")  # the same walk as the run that saved it
        set_rng_state(load_data(*rank_file(rank, "rng.pt"), numpy_arrays=True))
        with open(os.path.join(d, rank_dir(rank), "quarantine.json")) as f:
            state.quarantine = json.load(f)
        if audit is not None and os.path.exists(rank_file(rank, "audit.pt")[0]):
            audit.counts = load_data(*rank_file(rank, "audit.pt"))
    else:
        # re-cut the unconsumed records of every old rank for the new worker count; totals are
        # kept on rank 0 so sums over ranks stay right; random streams restart from a seed
        parts = reshard([part_from_json(p["remaining"] or []) for p in positions], W)
        state.part = None if mine["remaining"] is None else parts[rank]
        state.epoch_consumed_before = 0
        state.records_trained = sum(p["records_trained"] for p in positions) if rank == 0 else 0
        state.loss_sums = merge_loss_sums([p.get("loss_sums", {}) for p in positions]) if rank == 0 else {}
        state.loss_sums_prev = merge_loss_sums([p.get("loss_sums_prev", {}) for p in positions]) if rank == 0 else {}
        new_seed = reseed(cfg.run.seed, rank, step)
        if objective.gamma is not None:
            objective.gamma.generator.manual_seed(new_seed)
        if rank == 0:
            for p in positions:
                with open(os.path.join(d, rank_dir(p["rank"]), "quarantine.json")) as f:
                    state.quarantine.extend(json.load(f))
        if audit is not None and rank == 0:
            for p in positions:
                f, f_shown = rank_file(p["rank"], "audit.pt")
                if os.path.exists(f):
                    audit.add_counts(load_data(f, f_shown))
    # the step count the schedules plan for: kept while the plan holds (exact resume), re-planned from
    # the remaining data when the worker count, train.epochs or train.max_steps changed
    if not replan:
        state.total_steps = mine["total_steps"]
    else:
        current = state.epoch if state.part is not None else state.epoch - 1  # an uncut epoch counts whole
        total = step + remaining_steps(cfg, parts, current, total_rows(units), W)
        state.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    set_total_steps(scheduler, cfg, state.total_steps)
    state.resumes.append({"step": step, "world_size": W, "from_world_size": old_W, "optimizer": how,
                          **({"forced": forced} if forced else {})})
    return state
