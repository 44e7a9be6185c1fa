"""What may resume from a checkpoint: its surroundings must be the ones it was trained in.

A checkpoint's data position is "these rows of this epoch's plan are still to come", and the plan is
a function of the catalogue, `run.seed` and `data.shuffle`: resumed under another seed, the same
position names other rows (a 1,024-record simulation trained 61 records twice and skipped 61). The
step count and the LR/gamma schedules are planned in optimizer steps, which `data.batch_size` and
the gradient accumulation define. So every checkpoint carries the run's *identity* (those settings
and a sha256 of the catalogue's shard list) and a resume compares it with the current config:

- in the driver, before any cluster resource is used (`check_run`: the run's newest checkpoint, or
  `train.resume_from`), and
- in every worker, against the checkpoint it actually loads (`check_identity`).

A mismatch is refused with the differences and the two ways out: another `run.name` (a new run), or
`--force` / `train.resume_force=true` to resume anyway. Keys that may change on resume are left out:
the worker count (parts are re-cut), `train.epochs` / `train.max_steps` (extending a run).
"""

from __future__ import annotations

import json
import os
import sys


from gammaray.config import MOVED_KEYS, GammarayConfig, RunError
from pipelines import storage
from pipelines.storage import Store
from pipelines.catalogue import manifest_sha256
from workers.runtime import rank_dir
from workers.safe_load import CHECKPOINT_GLOBALS, check_no_links, check_torch_file


class ResumeMismatch(RunError):
    """A checkpoint trained under other data, seed or plan settings than the current config."""


def catalogue_sha256(manifest: dict) -> str:
    """The catalogue a data position refers to: its shards (path, rows, row groups, content hash),
    hashed once at commit into the manifest's header (pipelines/catalogue.py; an old manifest's is
    computed from its shard list with the same formula)."""
    return manifest_sha256(manifest)


def run_identity(cfg: GammarayConfig, manifest: dict) -> dict:
    """The settings a checkpoint's position and schedules mean something under. Take it from the
    config as the user wrote it (before `auto` keys are resolved for a cluster), so that
    data.batch_size=auto resumes on another cluster size."""
    identity = {
        "catalogue_sha256": catalogue_sha256(manifest), "catalogue_records": int(manifest["num_records"]),
        "run.seed": cfg.run.seed, "data.shuffle": cfg.data.shuffle, "data.batch_size": cfg.data.batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
    }
    if cfg.data.batch_size == "auto":
        identity["ray.auto.global_batch_size"] = cfg.ray.auto.global_batch_size
    return identity


def differences(saved: dict, current: dict) -> list[str]:
    out = []
    if saved.get("catalogue_sha256") != current["catalogue_sha256"]:
        out.append(f"the catalogue (data.train) differs: the checkpoint's had {saved.get('catalogue_records')} records "
                   f"(sha256 {str(saved.get('catalogue_sha256'))[:12]}), this one has {current['catalogue_records']} "
                   f"(sha256 {current['catalogue_sha256'][:12]})")
    old_names = {new: old for old, new in MOVED_KEYS.items()}  # checkpoints written before a key moved
    for key in current:
        if key.startswith("catalogue_"):
            continue
        was = saved.get(key, saved.get(old_names.get(key, key)))
        if was != current[key]:
            out.append(f"{key} was {was!r}, now {current[key]!r}")
    return out


def check_identity(saved: dict | None, current: dict, cfg: GammarayConfig, shown: str) -> list[str]:
    """Raise ResumeMismatch when `saved` (a checkpoint's identity) differs from `current`, unless
    train.resume_force; returns the differences (for the record of a forced resume). A checkpoint
    written before identities existed cannot be checked and is accepted."""
    if not saved:
        return []
    diff = differences(saved, current)
    if diff and not cfg.train.resume_force:
        raise ResumeMismatch(
            f"run {cfg.run.name!r} cannot resume from {shown}: " + "; ".join(diff) + ". Its data position and "
            "schedules only mean something under the settings it was trained with (resuming would train some "
            "records twice and skip others). Start a new run with another run.name, or resume anyway with --force "
            "(train.resume_force=true).")
    return diff


def _warn(message: str) -> None:
    print(f"gammaray: warning: {message}", file=sys.stderr, flush=True)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the checkpoints it registered


def registered_checkpoints(run_uri: str, store: Store) -> set[str] | None:
    """The checkpoint folder names Ray Train registered for this run (its snapshot lists them once
    every rank's upload finished); None when there is no readable snapshot."""
    uri = storage.join(run_uri, RAY_SNAPSHOT)
    if not store.exists(uri):
        return None
    try:
        snap = json.loads(store.read_bytes(uri))
    except ValueError:
        _warn(f"{uri} is empty or partial: checkpoints are judged by their own files")
        return None
    results = [*snap.get("checkpoint_results", []), snap.get("latest_checkpoint_result") or {}]
    return {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}


def read_state(folder: str, store: Store, rank: int = 0) -> dict | None:
    """A checkpoint's train_state.json of `rank`; None when it is missing, empty or partial (a save
    cut short by a full disk or a kill)."""
    uri = storage.join(folder, rank_dir(rank), "train_state.json")
    try:
        state = json.loads(store.read_bytes(uri))
    except ValueError:
        return None
    except OSError as err:
        if storage.is_not_found(err):
            return None
        raise
    return state if isinstance(state, dict) and "step" in state else None


def is_complete(folder: str, store: Store) -> bool:
    """Every rank's state file is there and whole, and so is every file it lists with its size (a
    checkpoint saved before the sizes were recorded is judged by its state files alone)."""
    states = [read_state(folder, store)]
    if states[0] is None:
        return False
    states += [read_state(folder, store, r) for r in range(1, int(states[0].get("world_size", 1)))]
    if any(s is None for s in states):
        return False
    listed = {rel: size for s in states for rel, size in (s.get("files") or {}).items()}
    if not listed:
        return True
    sizes = store.file_sizes(folder)
    return all(sizes.get(rel) == size for rel, size in listed.items())


def newest_checkpoint(run_uri: str, store: Store) -> str | None:
    """The run's newest complete checkpoint folder (Ray names them checkpoint_<timestamp>; a resume
    starts from the newest one). A folder Ray Train never registered (its upload did not finish: a
    full disk, a killed driver) or with an empty or partial state file is skipped with a warning:
    Ray resumes from the last registered checkpoint, and so does the driver's check."""
    found = store.list_files(run_uri, suffix=f"{rank_dir(0)}/train_state.json")
    folders = sorted(f.rsplit(f"/{rank_dir(0)}/", 1)[0] for f in found
                     if f.rsplit(f"/{rank_dir(0)}/", 1)[0].rsplit("/", 1)[-1].startswith("checkpoint_"))
    registered = registered_checkpoints(run_uri, store)
    for folder in reversed(folders):
        if registered is not None and folder.rsplit("/", 1)[-1] not in registered:
            _warn(f"{folder}: skipped: Ray Train never registered this checkpoint (its save did not finish: storage "
                  "full, or the run stopped mid-save)")
        elif not is_complete(folder, store):
            _warn(f"{folder}: skipped: a state file is empty or partial (its save did not finish)")
        else:
            return folder
    return None


def check_checkpoint(folder: str, store: Store) -> None:
    """Driver side, before any cluster resource is asked for: refuse a checkpoint folder (local or in
    object storage) that holds a link (local) or a .pt file naming a global outside what gammaray
    and DeepSpeed write. Only each file's pickle is read (seeks into the zip), never its tensors.
    The workers check again as they load (a Tune trial builds its trainer directly)."""
    if not storage.is_remote(folder) and os.path.exists(folder):
        check_no_links(folder)
    for uri in store.list_files(folder, ".pt"):
        with store.open_random_access(uri) as f:
            check_torch_file(f, uri, CHECKPOINT_GLOBALS)


def check_run(cfg: GammarayConfig, store: Store, run_uri: str, identity: dict) -> None:
    """Driver side, before any cluster resource: the checkpoint this run would resume from (its
    own newest complete one, else train.resume_from) must hold data only and match `identity`."""
    folder = newest_checkpoint(run_uri, store) or (cfg.train.resume_from.rstrip("/") if cfg.train.resume_from else None)
    if folder is None:
        return
    check_checkpoint(folder, store)  # a file that would run code: refused before the workers start
    state_uri = storage.join(folder, rank_dir(0), "train_state.json")
    if not store.exists(state_uri):
        return  # not a training checkpoint: the workers say so
    state = read_state(folder, store)
    if state is None:
        raise ResumeMismatch(f"run {cfg.run.name!r} cannot resume from {folder}: {state_uri} is empty or partial (a save "
                             "that did not finish). Point train.resume_from at a complete checkpoint, or start a new run "
                             "with another run.name.")
    check_identity(state.get("identity"), identity, cfg, folder)


def set_aside_partial_snapshot(store: Store, run_uri: str) -> str | None:
    """A Ray Train snapshot cut short by a full disk (empty or partial JSON) stops Ray's controller on
    every re-run. Move it aside (`.partial`) and return the newest complete checkpoint folder, for
    train.resume_from: the run then resumes from it instead of failing to start."""
    uri = storage.join(run_uri, RAY_SNAPSHOT)
    if not store.exists(uri):
        return None
    data = store.read_bytes(uri)
    try:
        json.loads(data)
        return None
    except ValueError:
        pass
    store.write_bytes(uri + ".partial", data)
    store.delete_file(uri)
    folder = newest_checkpoint(run_uri, store)
    _warn(f"{uri} was empty or partial (a save cut short): set aside as {RAY_SNAPSHOT}.partial; resuming from "
          f"{folder or 'the start'}")
    return folder
