"""Checkpoints of a mapping of components (`CheckpointManager(states={...})`, each a
workers/training/stateful.py `Stateful`): every rank saves each component's state dict into one folder
that Ray merges; `restore` reads such a folder on any worker count: each component loads its own rank's
state dict back (the same count: exact), or re-shards the old ranks' (another count).

The layout of a folder (the same in every checkpoint so far; `LAYOUT` maps components to files):

    deepspeed/                the engine's own files, one per rank (DeepSpeed's, or DDP's one file)
    portable.pt               the engine's world-size-independent copy (rank 0, train.portable_checkpoint)
    rank-NNNNN/loss_state.pt  the objective: this rank's shard of the loss state
    rank-NNNNN/rng.pt         the process's random streams
    rank-NNNNN/audit.pt       the sample audit's counts (train.audit_samples)
    rank-NNNNN/quarantine.json    the train state's quarantined records
    rank-NNNNN/train_state.json   the train state's position, with the rank, the world size and the size
                              of every file the rank wrote (written last: what tells a complete save)
    model/, config.json       the exported model (rank 0): for users, never read on a resume
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import ray.train
import torch

from gammaray.config import GammarayConfig
from pipelines import storage
from pipelines.storage import Store
from pipelines.tokenizer import load as load_tokenizer, tokenizer_uri
from workers.models.registry import save_model
from workers.runtime import rank_dir, RANK_DIR_PREFIX, run_dir, sync_buffers, world
from workers.safe_load import check_no_links, load as load_data
from workers.training.engine import PORTABLE_FILE, EngineState, is_zero3
from workers.training.quarantine import write_quarantine
from workers.training.resume import check_identity
from workers.training.rng import recut_seed
from workers.training.state import read_position, rank_folders
from workers.training.stateful import Recut, Reshardable


def loss_shard_ranks(old_W: int, W: int, rank: int) -> list[int]:
    """The old ranks whose loss-state shards hold entries of `rank` in a world of W: sample i lives in
    old shard i mod old_W and belongs to new rank i mod W, so only the old ranks congruent to `rank`
    modulo gcd(old_W, W) (one rank when the count is unchanged: its own)."""
    g = math.gcd(old_W, W)
    return [r for r in range(old_W) if r % g == rank % g]


def _every_rank(old_W: int, W: int, rank: int) -> list[int]:
    return list(range(old_W))


def _to_rank_zero(old_W: int, W: int, rank: int) -> list[int]:
    return list(range(old_W)) if rank == 0 else []


def _none(old_W: int, W: int, rank: int) -> list[int]:
    return []


@dataclass(frozen=True)
class RankFile:
    """One file of every rank folder: an entry of a component's state dict (`entry`; None: all of it)."""

    name: str
    entry: str | None = None
    recut_reads: Callable[[int, int, int], list[int]] = _none  # (old_W, W, rank): the old ranks a re-cut reads
    optional: bool = False  # a checkpoint saved without it loads (train.audit_samples was off)
    numpy_arrays: bool = False  # may hold numpy arrays (the RNG state), loaded as arrays only


INDEX_FILE = "train_state.json"  # every rank reads every rank's: it says the world size and the files
ENGINE = "engine"  # the one component that writes its own files (deepspeed/, portable.pt): EngineState
LAYOUT: dict[str, tuple[RankFile, ...]] = {  # component -> its files, in the order they are saved and loaded
    "objective": (RankFile("loss_state.pt", recut_reads=loss_shard_ranks),),
    "rng": (RankFile("rng.pt", numpy_arrays=True),),  # restarted from a seed on another worker count: nothing to read
    "audit": (RankFile("audit.pt", entry="counts", recut_reads=_to_rank_zero, optional=True),),
    "train_state": (RankFile("quarantine.json", entry="quarantine", recut_reads=_to_rank_zero),
                    RankFile(INDEX_FILE, entry="position", recut_reads=_every_rank)),
}
OPTIONAL = frozenset({"audit"})  # components a run may leave out of its states


def latest_checkpoint(cfg: GammarayConfig, store: Store, in_ray: bool):
    """[ray] The run's latest checkpoint, else train.resume_from (in `store`), else None."""
    ckpt = ray.train.get_checkpoint() if in_ray else None
    if ckpt is None and cfg.train.resume_from:
        fs, path = store.resolve(cfg.train.resume_from)
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    return ckpt


def checkpoint_uri(ckpt) -> str:
    """A Ray checkpoint's location as a URI (for messages)."""
    return ("s3://" if "s3" in ckpt.filesystem.type_name else "") + ckpt.path


def written_files(d: str) -> dict[str, int]:
    """{path relative to d: size in bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, d).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def export_model(engine, cfg: GammarayConfig, store: Store, out_dir: str | None) -> None:
    """Towers in Hugging Face format plus the heads (the tokenizer read from `store`); under ZeRO-3
    the weights are gathered first (every rank must call this)."""
    model = engine.module
    if is_zero3(engine):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if out_dir is not None:
                save_model(model, out_dir, cfg.model, load_tokenizer(tokenizer_uri(cfg), store))
        return
    if out_dir is not None:
        save_model(model, out_dir, cfg.model, load_tokenizer(tokenizer_uri(cfg), store))


def files_needed(rel: str, rank: int, W: int, old_W: int) -> bool:
    """Whether this rank's restore reads the checkpoint file `rel` (a path relative to the folder).
    The model export (`model/`, config.json) is for users, not for resuming; a rank folder's files
    other than the small train_state.json are read by the ranks that own their contents (`LAYOUT`)."""
    top, _, rest = rel.partition("/")
    if top == "deepspeed":
        return True  # the engine's own files: DeepSpeed opens what it needs of them
    if rel == PORTABLE_FILE:
        return old_W != W
    if not top.startswith(RANK_DIR_PREFIX) or not rest:
        return False
    r = int(top[len(RANK_DIR_PREFIX):])
    if rest == INDEX_FILE:
        return True
    if old_W == W:
        return r == rank
    return any(f.name == rest and r in f.recut_reads(old_W, W, rank) for files in LAYOUT.values() for f in files)


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

        fetch(f"{rank_dir(0)}/{INDEX_FILE}")  # says the world size the checkpoint was saved with
        old_W = int(read_position(d, 0)["world_size"])
        for rel in rels:
            if rel != f"{rank_dir(0)}/{INDEX_FILE}" and files_needed(rel, rank, W, old_W):
                fetch(rel)
        for rel in rels:  # every rank's folder, for the completeness check
            if rel.startswith(RANK_DIR_PREFIX) and "/" in rel:
                os.makedirs(os.path.join(d, rel.split("/", 1)[0]), exist_ok=True)
        yield d




class CheckpointManager:
    """Saves and restores this rank's part of a run's checkpoints. `states` maps the names of `LAYOUT`
    plus "engine" to the components (a None value, or a key left out, is a component this run does not
    have: only "audit" may be); `cfg` says where the run is and what it may resume from, `store` is
    the run's storage."""

    def __init__(self, states: Mapping[str, Reshardable | EngineState | None], cfg: GammarayConfig, store: Store,
                 in_ray: bool = True):
        states = {k: v for k, v in states.items() if v is not None}
        known = {ENGINE, *LAYOUT}
        unknown = sorted(set(states) - known)
        if unknown:
            raise ValueError(f"unknown checkpoint component(s) {unknown}: a checkpoint holds {sorted(known)}")
        missing = sorted(known - OPTIONAL - set(states))
        if missing:
            raise ValueError(f"checkpoint component(s) {missing} missing from the states given ({sorted(states)}); "
                             f"only {sorted(OPTIONAL)} may be left out")
        self.states = states
        self.engine: EngineState = states[ENGINE]
        self.train = states["train_state"]
        self.cfg, self.store, self.in_ray = cfg, store, in_ray
        self.rank, self.world_size = world()

    # save --------------------------------------------------------------------------------------
    def save(self, metrics: dict, final: bool = False) -> None:
        """Every rank writes its part of one checkpoint folder and reports it with `metrics` ([ray]: Ray
        merges the ranks' folders); outside Ray the final one is copied to <run>/local-checkpoint."""
        sync_buffers(self.engine.engine)  # [dist] one set of BatchNorm statistics in the checkpoint and the export
        with tempfile.TemporaryDirectory(prefix="gammaray-ckpt-") as d:
            self.write(d)
            if self.in_ray:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))  # [ray]
            else:
                local = storage.join(run_dir(self.cfg), "local-checkpoint")
                if final and not storage.is_remote(local):
                    shutil.rmtree(local, ignore_errors=True)
                    shutil.copytree(d, local)

    def write(self, d: str, export: bool = True) -> None:
        """This rank's files of a checkpoint in folder `d` (collective: every rank calls it);
        `export=False` leaves the model export out (tests)."""
        self.engine.save(d)                                                        # [ds] every rank
        rdir = os.path.join(d, rank_dir(self.rank))
        os.makedirs(rdir)
        index = {}
        for key, files in LAYOUT.items():
            if key not in self.states:
                continue
            state = self.states[key].state_dict()
            for f in files:
                value = state if f.entry is None else state[f.entry]
                if f.name == INDEX_FILE:
                    index = value
                elif f.name.endswith(".json"):
                    with open(os.path.join(rdir, f.name), "w") as fh:
                        json.dump(value, fh)
                else:
                    torch.save(value, os.path.join(rdir, f.name))
        write_quarantine(self.train, self.cfg, self.store, self.rank)
        if export and self.rank == 0:
            export_model(self.engine.engine, self.cfg, self.store, os.path.join(d, "model"))
            with open(os.path.join(d, "config.json"), "w") as fh:
                json.dump(self.cfg.model_dump(mode="json"), fh, indent=1)
        elif export:
            export_model(self.engine.engine, self.cfg, self.store, None)  # ZeRO-3 gathers are collective
        # last, with the size of every file this rank wrote: Ray uploads the folder in no set order, so
        # a save cut short (a full disk) can leave this file whole beside a truncated engine file, and
        # the sizes are what tells a complete checkpoint (workers/training/resume.py is_complete)
        index = {"rank": self.rank, "world_size": self.world_size, **index, "files": written_files(d)}
        with open(os.path.join(rdir, INDEX_FILE), "w") as fh:
            json.dump(index, fh)

    # restore -----------------------------------------------------------------------------------
    def restore(self, ckpt) -> None:
        """[ray] From a Ray checkpoint, local (read in place) or in object storage (only the files
        this rank reads are copied)."""
        with local_checkpoint(ckpt, self.rank, self.world_size) as d:
            self.restore_folder(d, checkpoint_uri(ckpt))

    def restore_folder(self, d: str, shown: str | None = None) -> None:
        """Every rank, from one checkpoint folder saved with any worker count. `shown` names the
        checkpoint in errors: a file that would run code (workers/safe_load.py) or a checkpoint trained
        under other data, seed or plan settings (workers/training/resume.py) is refused."""
        shown = shown or d
        check_no_links(d, shown)  # links could hand DeepSpeed (which follows them) files no check has seen
        first = read_position(d, 0)
        forced = check_identity(first.get("identity"), self.train.identity, self.cfg, shown)
        rank, W, old_W = self.rank, self.world_size, first["world_size"]
        same_world = old_W == W
        folders = rank_folders(d)
        if folders != list(range(old_W)):
            raise RuntimeError(f"{shown}: incomplete checkpoint, rank folders {folders} of {old_W}")
        mine = read_position(d, rank) if same_world else first
        # every rank's position only where it is needed: a re-cut, or a re-planned schedule
        replan = self.train.needs_replan(mine, W)
        positions = [read_position(d, r) for r in range(old_W)] if replan else None
        how = self.engine.load(d, same_world, shown)                               # [ds]
        if same_world:  # each component's own state dict: the run goes on exactly as it would have
            for key, files in LAYOUT.items():
                if key in self.states and (state := self._read(d, rank, files, shown)) is not None:
                    self.states[key].load_state_dict(state)
        else:  # each component re-shards the old ranks' state dicts; random streams restart from a seed
            recut = Recut(rank=rank, world_size=W, old_world_size=old_W, seed=recut_seed(self.cfg.run.seed, rank, first["step"]))
            for key in LAYOUT:
                if key in self.states:
                    self.states[key].reshard(self._shards(d, key, recut, shown), recut)
        # the step count the schedules plan for: kept while the plan holds (exact resume), re-planned from
        # the remaining data when the worker count, train.epochs or train.max_steps changed
        if replan:
            self.train.replan(self.cfg, positions, W)
        self.engine.set_total_steps(self.train.total_steps)
        self.train.resumes.append({"step": self.train.step, "world_size": W, "from_world_size": old_W, "optimizer": how,
                                   **({"forced": forced} if forced else {})})

    def _shards(self, d: str, key: str, recut: Recut, shown: str) -> Iterator[dict]:
        """The state dicts of the old ranks this rank's part of component `key` comes from, each with
        the entries this rank reads of it; one file at a time (a generator)."""
        files = LAYOUT[key]
        reads = {f.name: set(f.recut_reads(recut.old_world_size, recut.world_size, recut.rank)) for f in files}
        for r in sorted(set().union(*reads.values())):
            state = self._read(d, r, tuple(f for f in files if r in reads[f.name]), shown)
            if state is not None:
                yield state

    @staticmethod
    def _read(d: str, r: int, files: tuple[RankFile, ...], shown: str) -> dict | None:
        """Rank r's state dict of a component stored in `files`; None when an optional file is absent."""
        state: dict = {}
        for f in files:
            rel = f"{rank_dir(r)}/{f.name}"
            path = os.path.join(d, rel)
            if not os.path.exists(path):
                if f.optional:
                    return None
                raise RuntimeError(f"{shown}: incomplete checkpoint, no {rel}")
            if f.name.endswith(".json"):
                with open(path) as fh:
                    value = json.load(fh)
            else:
                value = load_data(path, f"{shown}/{rel}", numpy_arrays=f.numpy_arrays)
            if f.entry is None:
                return value
            state[f.entry] = value
        return state
