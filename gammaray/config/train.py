"""train.*: the engine, the optimizer, the schedule, checkpoints; the keys that moved here."""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


# --------------------------------------------------------------------------------------------
# training


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="ZeRO stage.")


# keys that moved: the old path is read (YAML, --set, Tune spaces) with a warning naming the new one
MOVED_KEYS = {
    "train.deepspeed.precision": "train.precision",
    "train.deepspeed.gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train.deepspeed.gradient_clipping": "train.gradient_clipping",
}


def moved_key_warning(old: str) -> None:
    warnings.warn(f"config key {old} is now {MOVED_KEYS[old]} (every engine uses it, not only DeepSpeed); "
                  f"the old key still works for now", FutureWarning, stacklevel=3)


def canonical_path(path: str) -> str:
    """A dotted path with a moved key's old name replaced by its new one (and a warning)."""
    if path in MOVED_KEYS:
        moved_key_warning(path)
        return MOVED_KEYS[path]
    return path


class OptimConfig(Section):
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up, then cosine decay to min_lr_ratio.")
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto", description="torch AdamW's kernel: auto = fused on GPU (one kernel for all parameters), foreach "
        "on CPU (one op per parameter list instead of per tensor). Same update within float rounding.")


class TrainConfig(Section):
    workers: int | Literal["auto"] = Field(
        2, description="Ray Train workers (0 = run the loop in the driver; auto = one per GPU with use_gpu, "
                       "else one per node, see ray.auto)."
    )
    cpus_per_worker: float = Field(0.5, gt=0.0, description="Logical CPUs per worker (fractional avoids deadlock).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL.")
    strategy: Literal["deepspeed", "ddp"] = Field(
        "deepspeed", description="deepspeed: a DeepSpeed engine (train.deepspeed); ddp: torch DDP via "
        "ray.train.torch.prepare_model (same optimizer, schedule, clipping, accumulation and bf16 autocast).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement of the workers on the cluster's nodes (STRICT_SPREAD: one per node).")
    epochs: int = Field(6, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (raising it and re-running extends a run).")
    log_every: int = Field(10, ge=1, description="Optimizer steps between metric reports.")
    checkpoint_every: int = Field(200, ge=1, description="Optimizer steps between checkpoints (and one at the end).")
    eval_every: int | None = Field(None, ge=1, description="Steps between validation R@1 (None = end only).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (best by validation R@1 when it runs).")
    max_failures: int = Field(
        3, ge=-1, description="Restarts of the workers from the last checkpoint after a failure (a lost worker or node, "
        "storage down for longer than storage.retry_time_s, ...) without a person; each costs a worker start-up and the "
        "steps since that checkpoint, and an error that repeats (too many bad records) is retried this often before "
        "the run fails. 0: fail at once, -1: unlimited.")
    portable_checkpoint: bool = Field(
        True, description="Also write the full fp32 weights and Adam moments once (rank 0, 12 bytes/parameter) so "
        "that a resume on a different worker count keeps the optimizer state (DeepSpeed's own files are per rank).")
    resume_from: str | None = Field(
        None, description="Checkpoint folder (local or s3://) to start from when the run has none of its own, "
        "e.g. another run's checkpoint on a different worker count.")
    resume_force: bool = Field(
        False, description="Resume even when the checkpoint was trained under another catalogue, run.seed, "
        "data.shuffle, data.batch_size or gradient accumulation (refused by default: its data position would "
        "train some records twice and skip others). `gammaray pretrain --force` sets it.")
    audit_samples: bool = Field(
        False, description="Count every sample_index trained per epoch (checkpointed) and fail the run if one is "
        "trained twice in an epoch; the counts go to the metrics. For tests and debugging: N bytes per worker.")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="Image tower weights and pixels in channels_last (NHWC) memory: the layout GPU "
        "convolution kernels (cuDNN, tensor cores) are fastest in. auto = on GPU only.")
    tf32: bool | Literal["auto"] = Field(
        "auto", description="Let float32 matmuls and convolutions use TF32 tensor cores (Ampere and later). "
        "auto = on GPU only (a no-op on CPU).")
    pin_memory: bool | Literal["auto"] = Field(
        "auto", description="Copy host batches into pinned memory and to the GPU with non_blocking, one batch "
        "ahead of the step that uses it. auto = on GPU only.")
    compile: bool = Field(
        False, description="torch.compile the model before training (the first steps then pay the "
        "compilation; the loss runs eagerly; off until measured to pay on the run's hardware).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU (DeepSpeed's bf16, DDP's and in-process bf16 autocast).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step (every engine).")
    gradient_clipping: float = Field(1.0, ge=0.0, description="Global grad-norm clip (0 = off; every engine).")
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        """train.deepspeed.{precision,gradient_accumulation_steps,gradient_clipping} of older configs."""
        ds = data.get("deepspeed") if isinstance(data, dict) else None
        if isinstance(ds, dict):
            for old, new in MOVED_KEYS.items():
                key = old.rsplit(".", 1)[1]
                if key in ds:
                    moved_key_warning(old)
                    data = {**data, "deepspeed": {k: v for k, v in data["deepspeed"].items() if k != key},
                            new.rsplit(".", 1)[1]: ds[key]}
        return data

    @field_validator("workers")
    @classmethod
    def _workers_non_negative(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v


