"""The run's place and folders, shared by training, evaluation, embedding and tuning: this process's
rank and device, the run directory, the checkpoint rank folders, library start-up
(quiet logs, DeepSpeed without MLflow) and the buffers every rank must agree on. Ray start-up and
the "auto" keys are workers/cluster.py; a rank's batches and the lockstep walk workers/batches.py."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

from gammaray.config import GammarayConfig
from pipelines import storage


# --------------------------------------------------------------------------------------------
# the run's place: rank, device, folders


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
    except Exception:  # noqa: BLE001
        pass
    # DeepSpeed sets its logger's level when it is imported: import_deepspeed quietens it then, so a
    # DDP or single-process run never pays the import (~6 s of CPU per worker)


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
    deepspeed.utils.logger.setLevel(logging.WARNING)  # per-step info lines drown the driver's progress bar
    return deepspeed


RANK_DIR_PREFIX = "rank-"


def rank_dir(rank: int) -> str:
    """The folder of one rank's files inside a checkpoint (`rank-00000`, ...)."""
    return f"{RANK_DIR_PREFIX}{rank:05d}"


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
