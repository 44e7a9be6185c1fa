"""The runtime plumbing that training, evaluation, embedding and tuning share: this process's place in
the world (rank, device), Ray start-up, the lockstep walk over a rank's batches, the stream spec of a
catalogue, the run's folders (run directory, tokenizer, checkpoint rank folders), and the resolution
of the config keys set to "auto" from the Ray cluster's resources.

Ray is imported inside the functions that need it: importing this module (and so the metric and
model code that sits on it) costs no Ray import.

"auto" keys. One config runs unchanged on a laptop, one GPU node or N GPU nodes. Three keys may say
"auto"; `pretrain` resolves them once, after connecting to Ray and before building the trainer, and
the resolved values are what the run records (checkpoint config.json, metrics):

| key | "auto" becomes |
|---|---|
| `train.workers` | with `train.use_gpu`: one worker per GPU in the cluster; on CPU: one worker per node that has CPUs (torch uses the node's cores inside the worker). Bounded by `ray.auto.min_workers` / `ray.auto.max_workers`. |
| `data.batch_size` | per-worker micro-batch `ceil(ray.auto.global_batch_size / workers)`, clamped to `[ray.auto.min_micro_batch, ray.auto.max_micro_batch]`: the global batch (and so the steps per epoch and the LR schedule) stays the same when the worker count changes, as long as the clamp allows. |
| `data.preprocess_concurrency` | the cluster's logical CPUs left after the training workers (`workers x train.cpus_per_worker`), divided among the workers' Ray Data pipelines in tasks of `data.preprocess_num_cpus`, at least 1. |

Keys given as numbers are never touched. This module is a pure function of (config, resources)
plus a thin reader of `ray.cluster_resources()` / `ray.nodes()`; it imports Ray only there.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from gammaray.config import ConfigError, GammarayConfig, apply_overrides
from gammaray.schema import BatchKeys as K
from pipelines import storage
from pipelines.ray_start import private_tmpdir_for_ray
from pipelines.preprocess import PreprocessSpec
from pipelines.stream import StreamBatch, StreamSpec, UnitTable


# --------------------------------------------------------------------------------------------
# "auto" keys: resolved from the cluster's resources


@dataclass(frozen=True)
class ClusterResources:
    """What "auto" looks at: totals over the alive nodes, and the nodes that have CPUs."""

    cpus: float
    gpus: float
    nodes_with_cpus: int

    @classmethod
    def from_ray_nodes(cls, nodes: Iterable[Mapping[str, Any]]) -> "ClusterResources":
        alive = [n for n in nodes if n.get("Alive", n.get("alive", False))]
        cpus = sum(float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive)
        gpus = sum(float(n.get("Resources", {}).get("GPU", 0.0)) for n in alive)
        with_cpus = sum(1 for n in alive if float(n.get("Resources", {}).get("CPU", 0.0)) >= 1.0)
        return cls(cpus=cpus, gpus=gpus, nodes_with_cpus=with_cpus)

    @classmethod
    def of_connected_cluster(cls) -> "ClusterResources":
        import ray

        return cls.from_ray_nodes(ray.nodes())

    def describe(self) -> str:
        return f"{self.nodes_with_cpus} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs"


def needs_resolution(cfg: GammarayConfig) -> bool:
    return "auto" in (cfg.train.workers, cfg.data.batch_size, cfg.data.preprocess_concurrency)


def resolve(cfg: GammarayConfig, res: ClusterResources) -> tuple[GammarayConfig, dict[str, Any]]:
    """(config with every "auto" replaced by a number, {dotted key: chosen value})."""
    auto = cfg.ray.auto
    chosen: dict[str, Any] = {}

    workers = cfg.train.workers
    if workers == "auto":
        if cfg.train.use_gpu:
            workers = int(math.floor(res.gpus + 1e-9))
            if workers < 1 and auto.min_workers <= 1:
                raise ConfigError(
                    f"train.workers=auto with train.use_gpu=true found no GPU in the cluster ({res.describe()}); "
                    "set train.workers to a number (an autoscaling cluster then adds GPU nodes for it) or "
                    "ray.auto.min_workers to the number of GPUs the run should wait for"
                )
        else:
            workers = max(1, res.nodes_with_cpus)
        workers = max(workers, auto.min_workers)
        if auto.max_workers is not None:
            workers = min(workers, auto.max_workers)
        chosen["train.workers"] = workers

    batch = cfg.data.batch_size
    if batch == "auto":
        per_worker = math.ceil(auto.global_batch_size / max(1, int(workers)))
        batch = min(max(per_worker, auto.min_micro_batch), auto.max_micro_batch)
        chosen["data.batch_size"] = batch

    if cfg.data.preprocess_concurrency == "auto":
        n = max(1, int(workers))
        free = res.cpus - n * cfg.train.cpus_per_worker if int(workers) > 0 else res.cpus
        chosen["data.preprocess_concurrency"] = max(1, int(math.floor(free / (n * cfg.data.preprocess_num_cpus) + 1e-9)))

    if not chosen:
        return cfg, chosen
    return apply_overrides(cfg, chosen), chosen


def resolve_for_cluster(cfg: GammarayConfig, log: bool = True) -> GammarayConfig:
    """Resolve against the Ray cluster this process is connected to (no-op without "auto" keys)."""
    if not needs_resolution(cfg):
        return cfg
    res = ClusterResources.of_connected_cluster()
    out, chosen = resolve(cfg, res)
    if log:
        what = ", ".join(f"{k}={v}" for k, v in chosen.items())
        print(f"gammaray: auto scaling on {res.describe()}: {what}", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# the run's place: rank, device, Ray, folders


def tokenizer_uri(cfg: GammarayConfig) -> str:
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    assert cfg.data.train
    return storage.join(cfg.data.train.rstrip("/").rsplit("/", 1)[0], "tokenizer")


def run_dir(cfg: GammarayConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(cfg: GammarayConfig, in_ray: bool) -> tuple[bool, torch.device]:
    if not (cfg.train.use_gpu and torch.cuda.is_available()):
        return False, torch.device("cpu")
    if in_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if isinstance(device, list):  # several GPUs per worker: the loop uses the first
            device = device[0]
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return True, device


def quiet_libraries() -> None:
    """Per-report lines, per-dataset plans and save_pretrained bars drown the driver's progress
    bar; warnings and errors still come through."""
    import ray.train.v2._internal.execution.context as train_context

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for name in ("ray.data", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        import_deepspeed().utils.logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass


def import_deepspeed():
    """`import deepspeed`, without the MLflow import its autotuner makes when MLflow is installed
    (`try: import mlflow` in deepspeed.autotuning): about 1.3 s of CPU in every training process,
    for a module DeepSpeed only uses to autotune. MLflow stays importable afterwards."""
    import sys

    blocked = "mlflow" not in sys.modules and "deepspeed" not in sys.modules
    if blocked:
        sys.modules["mlflow"] = None  # makes `import mlflow` raise ImportError
    try:
        import deepspeed
    finally:
        if blocked and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


_NODE_ID: str | None = None


def node_id() -> str:
    global _NODE_ID
    if _NODE_ID is None:
        try:
            import ray

            _NODE_ID = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except Exception:  # noqa: BLE001
            _NODE_ID = "local"
    return _NODE_ID


def ensure_ray(cfg: GammarayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):  # inside a Ray job RAY_ADDRESS names the cluster
        ray.init(address=cfg.ray.address)
        return
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    with private_tmpdir_for_ray():
        # the dashboard process also serves the state API that Ray Train's placement-group cleaner polls
        ray.init(num_cpus=num_cpus, log_to_driver=True, logging_config=ray.LoggingConfig(log_level="WARNING"),
                 runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if cfg.train.use_gpu else "cpu")}})


RANK_DIR_PREFIX = "rank-"


def rank_dir(rank: int) -> str:
    """The folder of one rank's files inside a checkpoint (`rank-00000`, ...)."""
    return f"{RANK_DIR_PREFIX}{rank:05d}"


# --------------------------------------------------------------------------------------------
# batches across ranks


def to_torch(arrays: dict[str, np.ndarray], device: torch.device, pin: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a batch. An array over a read-only buffer (Arrow's, zero-copy) is copied once, by
    torch.tensor, straight to `device`: a CPU tensor sharing it would let an in-place op write memory
    Arrow owns. Writable arrays stay zero-copy on the CPU. `pin` (a GPU device): through pinned host
    memory with non_blocking, so the copy runs while the GPU still works on the previous step."""

    def tensor(v: np.ndarray) -> torch.Tensor:
        v = np.ascontiguousarray(v)
        if pin and device.type == "cuda":
            return torch.from_numpy(v if v.flags.writeable else v.copy()).pin_memory().to(device, non_blocking=True)
        return torch.from_numpy(v).to(device) if v.flags.writeable else torch.tensor(v, device=device)

    return {k: tensor(v) for k, v in arrays.items()}


def placeholder_batch(cfg: GammarayConfig, with_aug: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-row stand-in for a rank whose part ran out first: it takes the step with weight 0 so
    that every rank runs the same collectives (DeepSpeed gradient reduction, the loss-state exchange)."""
    H, L = cfg.data.image_size, cfg.data.max_text_tokens
    ids = torch.zeros(1, L, dtype=torch.long)
    mask = torch.zeros(1, L, dtype=torch.long)
    mask[0, 0] = 1
    b = {K.SAMPLE_INDEX: torch.zeros(1, dtype=torch.long), K.PIXELS: torch.zeros(1, 3, H, H),
         K.INPUT_IDS: ids, K.ATTENTION_MASK: mask}
    pair = cfg.data.view_pair
    if pair == "text_text":
        del b[K.PIXELS]
        b.update({K.INPUT_IDS_PAIR: ids.clone(), K.ATTENTION_MASK_PAIR: mask.clone()})
    elif pair == "image_image":
        del b[K.INPUT_IDS], b[K.ATTENTION_MASK]
        b[K.PIXELS_PAIR] = torch.zeros(1, 3, H, H)
    if with_aug:
        b.update({K.PIXELS_AUG: torch.zeros(1, 3, H, H), K.INPUT_IDS_AUG: ids.clone(), K.ATTENTION_MASK_AUG: mask.clone()})
    return {k: v.to(device) for k, v in b.items()}


def lockstep(batches: Iterator[StreamBatch], device: torch.device,
             clock: dict | None = None) -> Iterator[tuple[StreamBatch | None, int, bool]]:
    """[dist] Yield (this rank's batch or None, global number of good rows, last) until every rank is
    done; `last` says no rank has another batch. One all_reduce per batch, one batch read ahead.
    Time spent waiting for data is added to clock["wait"]."""
    it = iter(batches)
    distributed = dist.is_initialized() and dist.get_world_size() > 1

    def pull() -> tuple[StreamBatch | None, torch.Tensor]:
        t0 = time.perf_counter()
        sb = next(it, None)  # waiting for this rank's data pipeline (not for the other ranks)
        if clock is not None:
            clock["wait"] = clock.get("wait", 0.0) + time.perf_counter() - t0
        flag = torch.tensor([0 if sb is None else 1, 0 if sb is None else sb.size], dtype=torch.long, device=device)
        if distributed:
            dist.all_reduce(flag)
        return sb, flag

    cur, flag = pull()
    if int(flag[0]) == 0:
        return
    while True:
        nxt, nflag = pull()
        last = int(nflag[0]) == 0
        yield cur, int(flag[1]), last
        if last:
            return
        cur, flag = nxt, nflag


def batches_left(records_left: int, batch_size: int, device: torch.device) -> int:
    """[dist] How many lockstep batches the ranks take for the rest of an epoch: the most any rank can
    need, ceil(records left / batch size) (a batch holds batch_size good rows, so rejected records
    only make a rank need fewer). One all_reduce and host read per (re)start of an epoch, not per step."""
    n = -(-max(0, int(records_left)) // int(batch_size))
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t[0])
    return n


class Lockstep:
    """[dist] The training loop's walk over a rank's batches: yields (this rank's batch or None, its
    tensors on the device, global number of good rows, last) with no per-step host read.

    One process: the batches of the stream, read one ahead (`last` is the stream's end). Several:
    exactly `steps` batches on every rank (`batches_left`, agreed once per epoch; a checkpoint keeps
    `left` so that a resumed run takes the same steps); a rank whose stream ends first takes stand-in
    steps. The global row count is all-reduced on the device (a tensor, never
    read on the host: it only weights the loss). The next batch is copied to the device (pinned,
    non_blocking with `pin`) before the current one is yielded, so the copy overlaps the step.
    Time spent waiting for data is added to clock["wait"].

    A rank's batch count is only known up to the records its stream rejects: when every rank's
    stream rejected a whole batch's worth, the walk ends with a step of stand-ins only (weight 0)."""

    def __init__(self, batches: Iterator[StreamBatch], device: torch.device, steps: int | None = None,
                 clock: dict | None = None, pin: bool = False):
        self.it = iter(batches)
        self.device = device
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and steps is None:
            raise ValueError("a distributed lockstep needs the planned number of steps (batches_left)")
        self.total = steps
        self.done = 0
        self.clock = clock
        self.pin = pin

    @property
    def left(self) -> int | None:
        return None if self.total is None else self.total - self.done

    def _pull(self) -> tuple[StreamBatch | None, dict[str, torch.Tensor] | None]:
        from torch.profiler import record_function

        t0 = time.perf_counter()
        with record_function("step/data"):
            sb = next(self.it, None)  # waiting for this rank's data pipeline (not for the other ranks)
            if self.clock is not None:
                self.clock["wait"] = self.clock.get("wait", 0.0) + time.perf_counter() - t0
            tensors = to_torch(sb.arrays, self.device, self.pin) if sb is not None and sb.size > 0 else None
        return sb, tensors

    def __iter__(self) -> Iterator[tuple[StreamBatch | None, dict[str, torch.Tensor] | None, Any, bool]]:
        cur = self._pull()
        if not self.distributed:
            while cur[0] is not None:
                nxt = self._pull()
                self.done += 1
                yield cur[0], cur[1], cur[0].size, nxt[0] is None
                cur = nxt
            return
        while self.done < self.total:
            sb, tensors = cur
            # a fill, not torch.tensor(..., device=): a blocking host-to-device copy waits for the GPU
            n = torch.full((1,), 0 if sb is None else sb.size, dtype=torch.long, device=self.device)
            dist.all_reduce(n)  # no read: the loss weight is computed on the device
            self.done += 1
            last = self.done >= self.total
            cur = self._pull() if not last else (None, None)
            yield sb, tensors, n[0], last


def stream_spec(cfg: GammarayConfig, catalogue_uri: str, units, epoch: int, train: bool, with_aug: bool,
                batch_size: int) -> StreamSpec:
    d = cfg.data
    pp = PreprocessSpec(image_size=d.image_size, max_image_pixels=d.max_image_pixels,
                        max_text_tokens=d.max_text_tokens, max_text_chars=d.max_text_chars, augment=d.augment,
                        tokenizer_uri=tokenizer_uri(cfg), seed=cfg.run.seed, epoch=epoch,
                        with_aug_views=with_aug, train=train, view_pair=d.view_pair, pair_locale=d.pair_locale,
                        jpeg_draft=d.jpeg_draft, image_background=tuple(d.image_background))
    units = units if isinstance(units, UnitTable) else UnitTable.from_units(units)  # numpy columns, pickled as such
    return StreamSpec(catalogue_uri=catalogue_uri, units=units, preprocess=pp,
                      settings=storage.S3Settings.from_config(cfg.storage), shuffle=d.shuffle and train,
                      batch_size=batch_size, preprocess_num_cpus=d.preprocess_num_cpus,
                      prefetch_batches=d.prefetch_batches, concurrency=d.preprocess_concurrency,
                      segments_per_task=d.preprocess_segments_per_task)


@torch.no_grad()
def sync_buffers(model) -> None:
    """[dist] One set of module buffers on every rank, before evaluation and checkpoints.

    DeepSpeed keeps parameters identical across ranks but not buffers: each rank's BatchNorm tracks
    the statistics of its own batches. Floating buffers (running statistics) are averaged over ranks,
    the others (batch counters) broadcast from rank 0, so every rank evaluates the same model and
    the checkpoint (rank 0's module) is the model that was evaluated."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    W = dist.get_world_size()
    for buf in getattr(model, "module", model).buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf.data)
            buf.data.div_(W)
        else:
            dist.broadcast(buf.data, src=0)

