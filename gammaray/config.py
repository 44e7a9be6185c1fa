"""The one config tree.

Every component takes its own section of `GammarayConfig`. The same tree is loaded from YAML,
patched by dotted paths (`--set loss.gamma.alpha=2` on the CLI, a Ray Tune param space), and
validated before any cluster resource is used: unknown keys and wrong types are errors that name
the offending path.

Length (about 750 lines): the whole tree in one file on purpose, so a reader sees every key, its
default and its description in one place (docs/config-reference.md is generated from it).
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending dotted path."""


class RunError(RuntimeError):
    """A run stopped for a reason its message explains in full, with what to do next (storage
    unreachable for longer than storage.retry_time_s, a checkpoint refused, a resume that does not
    match the run): the CLI prints the message alone, without a traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# storage and run


class StorageConfig(Section):
    """How to reach object storage. Credentials are named, never written: the config holds the
    names of environment variables, so a saved config or job metadata never carries a secret."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint (e.g. http://127.0.0.1:8333); None = AWS_ENDPOINT_URL or AWS."
    )
    region: str | None = Field(None, description="S3 region; None = AWS_REGION or the server's default.")
    access_key_env: str = Field("AWS_ACCESS_KEY_ID", description="Env var holding the access key id.")
    secret_key_env: str = Field("AWS_SECRET_ACCESS_KEY", description="Env var holding the secret key.")
    retry_time_s: float = Field(
        180.0, ge=0.0, description="How long every operation on the run's storage (reads, checkpoint uploads, "
        "quarantine, metrics, eval outputs) keeps retrying transient errors (connection refused or reset, timeouts, "
        "throttling, 5xx) with backoff before it fails with a short error naming the endpoint; 0 = fail at the first one.")
    retries: int = Field(
        5, ge=0, description="Attempts after the first for a read from a host that is not the run's storage (an "
        "http(s) image URL of a catalogue): past them a host that does not answer is the record's fault, not an outage.")


class RunSection(Section):
    name: str = Field("gammaray-demo", description="Run name; re-running with the same name resumes.")
    storage: str = Field(
        "runs", description="Where checkpoints, metrics and quarantine go: a local path or s3://bucket/prefix."
    )
    seed: int = Field(0, description="Seed for data order, augmentation, init and the gamma E-step.")
    deterministic: bool = Field(False, description="torch deterministic algorithms (exact resume on CPU).")

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("run name must be a non-empty path-safe string without '/'")
        return v


class AutoScalingConfig(Section):
    """How the keys set to "auto" (train.workers, data.batch_size, data.preprocess_concurrency) are
    derived from the cluster's resources when the trainer is built (workers/cluster.py), so one
    config runs unchanged on a laptop, one GPU node or N GPU nodes."""

    global_batch_size: int = Field(
        64, ge=1, description="data.batch_size=auto: per-worker micro-batch = ceil(this / workers), clamped below."
    )
    min_micro_batch: int = Field(8, ge=1, description="Smallest per-worker micro-batch that auto picks.")
    max_micro_batch: int = Field(64, ge=1, description="Largest per-worker micro-batch that auto picks.")
    max_workers: int | None = Field(None, ge=1, description="Upper bound of train.workers=auto (None = no bound).")
    min_workers: int = Field(
        1, ge=1, description="train.workers=auto never goes below this (set it to the autoscaler's GPU maximum "
                             "to make a scaled-to-zero GPU group scale up)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoScalingConfig":
        if self.min_micro_batch > self.max_micro_batch:
            raise ValueError("min_micro_batch must not exceed max_micro_batch")
        if self.max_workers is not None and self.min_workers > self.max_workers:
            raise ValueError("min_workers must not exceed max_workers")
        return self


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster address for ray.init; None = $RAY_ADDRESS (set inside a Ray job) or a new "
                          "local instance."
    )
    num_cpus: int | None = Field(
        None, description="Logical CPUs of a local instance (default max(4, cores): leaves room for Ray Data)."
    )
    auto: AutoScalingConfig = AutoScalingConfig()


# --------------------------------------------------------------------------------------------
# data


class AugmentConfig(Section):
    crop_scale: tuple[float, float] = Field((0.6, 1.0), description="Random resized crop area range.")
    flip: bool = True
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="Brightness/contrast/saturation jitter.")
    token_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Probability of dropping a text token.")
    word_swap: float = Field(0.1, ge=0.0, lt=1.0, description="Probability of swapping adjacent words.")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError("crop_scale must satisfy 0 < lo <= hi <= 1")
        return v


class FeatureStoreConfig(Section):
    """Cached pooled features of locked towers (written by `gammaray embed --features`): with
    `train` set, `gammaray pretrain` trains only the heads (and temperature), in one process, from
    these vectors; no tower runs, so it goes at thousands of records/s on a CPU."""

    train: str | None = Field(None, description="Feature store of data.train (local or s3://); None = train the towers live.")
    val: str | None = Field(None, description="Feature store of data.val (held-out evaluation while training heads).")


Channel = Annotated[int, Field(ge=0, le=255)]  # one 8-bit colour channel


class DataConfig(Section):
    train: str | None = Field(None, description="Prepared catalogue (shards + manifest.json), local path or s3://.")
    val: str | None = Field(None, description="Held-out prepared catalogue for evaluation.")
    features: FeatureStoreConfig = FeatureStoreConfig()
    tokenizer: str | None = Field(
        None, description="Hugging Face tokenizer folder (local or s3://); None = <train>/../tokenizer."
    )
    view_pair: Literal["image_text", "text_text", "image_image"] = Field(
        "image_text", description="The positive pair: image_text (photo <-> text), text_text (text <-> its title in "
                                  "data.pair_locale, from the record's `titles`), image_image (photo <-> one of `extra_images`)."
    )
    pair_locale: str | None = Field(None, description="view_pair=text_text: locale of the second text (a key of `titles`).")
    image_size: int = Field(64, ge=8, description="Side of the square image fed to the image tower.")
    max_image_pixels: int = Field(25_000_000, ge=1, description="Larger images are quarantined (decompression bombs).")
    max_image_bytes: int = Field(
        64 * 2**20, ge=1, description="prepare: larger image files are quarantined as image_too_large, from their "
                                      "size before any byte is read (a read never goes past this many bytes)."
    )
    max_record_bytes: int = Field(
        16 * 2**20, ge=1, description="prepare: a JSONL or CSV line longer than this is quarantined as oversized_record "
                                      "while it streams past (never held in memory); a JSON array file is read whole "
                                      "only up to this size."
    )
    allow_outside_paths: bool = Field(
        False, description="prepare: read local image paths that resolve outside the source folder (.., absolute "
                           "paths, symlinks). Off: they are quarantined as image_path_outside_source."
    )
    image_background: tuple[Channel, Channel, Channel] = Field(
        (255, 255, 255), description="RGB colour that transparent pixels (RGBA, LA, palette or tRNS transparency) are "
                                     "composited onto when an image is decoded for training, embedding and evaluation."
    )
    max_text_tokens: int = Field(32, ge=4, description="Token budget per text (truncate/pad).")
    max_text_chars: int = Field(8192, ge=1, description="Longer texts are quarantined as oversized.")
    augment: AugmentConfig = AugmentConfig()
    batch_size: int | Literal["auto"] = Field(
        16, description="Per-device micro-batch of good records; auto = ray.auto.global_batch_size / workers."
    )
    shuffle: bool = Field(True, description="Shuffle row groups and rows within them every epoch (seeded).")
    preprocess_num_cpus: float = Field(
        1.0, gt=0, description="Logical CPUs per Ray Data read+preprocess task (below 1 packs more worker processes per "
                               "core: slower to start, rarely faster)."
    )
    preprocess_concurrency: int | Literal["auto"] | None = Field(
        None, description="Max concurrent read+preprocess tasks per training worker (None = as resources allow, "
                          "auto = the cluster's CPUs left by the training workers, shared among them)."
    )
    tokenizer_sample: int = Field(
        3_000_000, ge=1, description="Texts (titles, descriptions, categories) of a seeded sample of the catalogue that "
                                     "`prepare --build-tokenizer` trains the tokenizer on: its time stops growing "
                                     "with the catalogue beyond this.")
    preprocess_segments_per_task: int = Field(
        4, ge=1, description="Row groups read+preprocessed by one Ray Data task (the task's batch; more = fewer, larger tasks)."
    )
    prefetch_batches: int = Field(4, ge=0, description="Preprocessed blocks (row groups) buffered ahead of each training worker.")
    prefetch_next_epoch: bool = Field(
        True, description="Start the next epoch's pipeline once the current one has produced its last block."
    )
    jpeg_draft: bool = Field(True, description="Decode JPEGs at a reduced scale (libjpeg DCT scaling) when much larger than needed.")
    quarantine_max_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Abort the run if more than this fraction of records is bad."
    )

    @field_validator("batch_size", "preprocess_concurrency")
    @classmethod
    def _positive_or_auto(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


# --------------------------------------------------------------------------------------------
# model


def _default_image_tower() -> dict[str, Any]:
    # a small ResNet learns shapes from a few thousand images on CPU; a ViT this small does not
    return {
        "model_type": "resnet",
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128],
        "depths": [1, 1, 1],
        "layer_type": "basic",
    }


def _default_text_tower() -> dict[str, Any]:
    return {
        "model_type": "bert",
        "hidden_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 192,
        "max_position_embeddings": 64,
    }


class TowerConfig(Section):
    pretrained: str | None = Field(None, description="Local Hugging Face folder to initialise from.")
    hf_config: dict[str, Any] = Field(
        default_factory=dict, description="transformers config kwargs (model_type + sizes) for random init."
    )
    pooling: Literal["auto", "cls", "mean"] = Field("auto", description="How the tower's tokens become one vector.")
    locked: bool = Field(
        False, description="Freeze the tower (LiT; open_clip's --lock-image/--lock-text): no gradient, not in the "
                           "optimizer or its checkpointed state, always in eval mode (BatchNorm statistics and dropout "
                           "frozen). A fully locked tower's pooled features can be cached (`gammaray embed --features`)."
    )
    unlocked_layers: int = Field(
        0, ge=0, description="With locked: keep the tower's last N blocks (and the layers after them: final norm, "
                             "pooler, head convolution) trainable (open_clip's --lock-*-unlocked-groups)."
    )

    @property
    def fully_locked(self) -> bool:
        return self.locked and self.unlocked_layers == 0


class FusionConfig(Section):
    """The ALBEF-style fusion model (model.kind=fusion): a cross-attention encoder over the unimodal
    towers' tokens, trained by image-text matching with hard negatives; momentum (EMA) copies of the
    unimodal encoders give the augmented features of the structure regularizers."""

    layers: int = Field(2, ge=1, description="Cross-attention fusion layers (transformers Bert blocks).")
    heads: int | None = Field(None, ge=1, description="Attention heads of the fusion layers (None = the text tower's).")
    intermediate_size: int | None = Field(
        None, ge=1, description="Feed-forward width of the fusion layers (None = the text tower's, else 4x width)."
    )
    itm_weight: float = Field(
        1.0, ge=0.0, description="Weight of the image-text matching loss (0 = no ITM compute; the fusion encoder is then unused)."
    )
    momentum: float = Field(
        0.995, ge=0.0, lt=1.0, description="EMA coefficient of the momentum encoders (updated once per training forward)."
    )


class ModelConfig(Section):
    kind: Literal["two_tower", "fusion"] = Field(
        "two_tower", description="Model family: two_tower (CLIP-style) or fusion (ALBEF-style, see model.fusion)."
    )
    embed_dim: int = Field(64, ge=2, description="Dimension of the shared embedding space.")
    image: TowerConfig = TowerConfig(hf_config=_default_image_tower())
    text: TowerConfig = TowerConfig(hf_config=_default_text_tower(), pooling="mean")
    temperature: float = Field(0.1, gt=0.0, description="Initial temperature tau.")
    learn_temperature: bool = Field(True, description="Learn tau (as a log-scale) or keep it fixed.")
    max_logit_scale: float = Field(100.0, gt=0.0, description="Upper clamp of 1/tau.")
    specific_heads: bool | None = Field(
        None, description="Extra projection heads for modality-specific features (deep feature separation), exported "
                          "beside the shared ones. None = present exactly when loss.structure.lambda_sep > 0."
    )
    specific_dim: int | None = Field(None, ge=2, description="Dimension of the modality-specific features (None = embed_dim).")
    fusion: FusionConfig = FusionConfig()

    # resolved by GammarayConfig from loss.structure.lambda_sep (not part of the dumped tree)
    _sep_active: bool = PrivateAttr(False)

    def has_specific_heads(self) -> bool:
        return self.specific_heads if self.specific_heads is not None else self._sep_active


# --------------------------------------------------------------------------------------------
# losses


class GammaLossConfig(Section):
    alpha: float = Field(1.0, gt=0.0, description="Gamma shape (alpha=1: InfoNCE/SogCLR weighting).")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="EMA weight of the per-sample rate memory.")
    gamma_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or cosine from 1.0 down to gamma_min over the run."
    )
    gamma_min: float = Field(0.2, gt=0.0, le=1.0, description="Final EMA weight of the cosine schedule.")
    gamma_decay_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="cosine: reach gamma_min at this fraction of training, then hold it "
                                         "(1.0 = decay over the whole run)."
    )
    mode: Literal["mean", "sample"] = Field("mean", description="E-step: u=alpha/R (mean) or u~Gamma(alpha,R).")
    include_positive: bool = Field(
        False,
        description="Z_hat also averages the positive (False: in-batch negatives only, the minibatch estimate of the "
                    "negatives-only full-data objective: with the memory, less biased than without (relative gradient "
                    "bias 0.056 vs 0.141 at batch 8 and 1/tau=10 in tests/test_loss_gamma.py), not unbiased; True: mode=mean,gamma=1,alpha=1 is exactly "
                    "CLIP's InfoNCE).",
    )
    eps: float = Field(0.0, ge=0.0, description="Added to the rate R_i before u_i = alpha/(R_i + eps) (SogCLR's epsilon).")
    rescale_memory: bool = Field(
        False, description="The memory holds log R / logit_scale, so entries written at another temperature are "
                           "rescaled (R^(scale_now/scale_then)) before the EMA mixes in a new estimate."
    )
    track_age: bool = Field(
        True, description="Log how stale the memory is (gamma/memory_age_mean|max: steps since each anchor's entry "
                          "was last written); 4 bytes more per sample and worker shard (12 instead of 8)."
    )


class StructureConfig(Section):
    """Latent modality structure (Jiang et al., CVPR 2023). Every weight 0 = off, with no extra compute
    (no augmented views, no specific heads)."""

    in_modal: bool | Literal["auto"] = Field(
        "auto", description="Base loss L_con = 1/4 (V2T + T2V + V2V + T2T), the base the paper's results assume: "
                            "add in-modal InfoNCE terms (the augmented view is the positive) and halve the "
                            "cross-modal term. auto = on exactly when a regularizer weight is > 0 (a plain run "
                            "stays cross-modal only and needs no augmented views); true/false force it."
    )
    lambda_sep: float = Field(0.0, ge=0.0, description="Weight of deep feature separation L_ortho + L^i_con + L_uni (0 = off).")
    lambda_br: float = Field(0.0, ge=0.0, description="Weight of the Brownian-bridge loss (0 = off).")
    lambda_gc: float = Field(0.0, ge=0.0, description="Weight of geometric consistency (0 = off).")
    bridge_t: float = Field(0.25, gt=0.0, lt=1.0, description="Bridge point t (mu = t z_V + (1-t) z_T).")
    bridge_t_range: tuple[float, float] | None = Field(
        None, description="Sample t per sample uniformly from [lo, hi] each step instead of the fixed bridge_t."
    )
    gc_augmented: bool = Field(True, description="Geometric consistency also between each view and its augmented view.")

    def in_modal_active(self) -> bool:
        """in_modal resolved: auto = on exactly when a regularizer weight is > 0."""
        if self.in_modal == "auto":
            return self.lambda_sep > 0 or self.lambda_br > 0 or self.lambda_gc > 0
        return bool(self.in_modal)

    @field_validator("bridge_t_range")
    @classmethod
    def _t_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0.0 <= v[0] <= v[1] <= 1.0):
            raise ValueError("bridge_t_range must satisfy 0 <= lo <= hi <= 1")
        return v


class LossConfig(Section):
    kind: Literal["infonce", "gamma", "sogclr", "siglip"] = Field("gamma", description="Contrastive objective.")
    gather_negatives: bool = Field(
        False, description="InfoNCE/SigLIP: all-gather candidates across workers (with gradient)."
    )
    gamma: GammaLossConfig = GammaLossConfig()
    structure: StructureConfig = StructureConfig()


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
        False, description="torch.compile the model and the loss's score maths before training (the first "
        "steps then pay the compilation; off until measured to pay on the run's hardware).")
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


class EvalConfig(Section):
    prompt_template: str = Field("{}", description="Zero-shot prompt; {} = the category path, e.g. 'Bags > Backpacks'.")
    max_records: int | None = Field(None, ge=1, description="Cap on held-out records evaluated.")
    batch_size: int = Field(128, ge=1)
    probe_train: str | None = Field(
        None, description="Catalogue whose embeddings fit the linear/k-shot probes (gammaray eval); None = "
                          "a stratified part of the evaluated records."
    )
    probe_max_records: int | None = Field(None, ge=1, description="Cap on probe_train records embedded.")
    probe_test_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Without probe_train: fraction of each category held out to test the probes."
    )
    k_shots: list[int] = Field([1, 5, 10], description="k of the k-shot probes (k labelled examples per class).")
    k_shot_trials: int = Field(5, ge=1, description="Seeded draws of the k examples averaged per k-shot figure.")
    probe_l2: float = Field(1e-4, ge=0.0, description="L2 penalty of the logistic-regression probes.")
    specific_attributes: dict[Literal["image", "text"], list[str]] = Field(
        default_factory=dict,
        description="Attributes (keys of the records' `attributes`) that only one modality carries, probed from that "
                    "modality's embedding at every validation (linear probes, two-fold on the validation records): "
                    "val_probe_image_only, val_probe_text_only and their mean val_probe_specific, a Ray Tune "
                    "objective. Empty = none. The synthetic catalogue: {image: [pattern, size], text: [care, warranty]}."
    )


class TrackingConfig(Section):
    """Experiment tracking of pretrain, tune and eval runs (workers/tracking.py). Credentials stay in the
    environment that the tracking client reads itself (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD,
    WANDB_API_KEY), never in the config."""

    kind: Literal["none", "mlflow", "wandb"] = Field(
        "none", description="none; mlflow (pip install gammaray[mlflow]); wandb (pip install gammaray[wandb]; "
                            "WANDB_MODE=offline writes the runs locally).")
    uri: str | None = Field(
        None, description="mlflow: the tracking URI (http://host:5000, sqlite:///mlflow.db; None = MLFLOW_TRACKING_URI "
                          "or MLflow's default); wandb: the folder its run files go to (None = W&B's default).")
    experiment: str = Field("gammaray", description="The MLflow experiment / W&B project the runs go to.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on every run (string values).")


class ServeConfig(Section):
    """`gammaray serve`: the embedding service (Ray Serve, HTTP JSON; workers/evaluation/serve.py). The
    preprocessing (image size, tokenizer, text budget) is the checkpoint's own, never set here."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the service.")
    replicas: int = Field(1, ge=1, description="Copies of the model, each in its own Ray actor; requests are spread over them.")
    cpus_per_replica: float = Field(1.0, gt=0.0, description="Logical CPUs each replica reserves.")
    gpus_per_replica: float = Field(
        0.0, ge=0.0, description="GPUs each replica reserves (a fraction shares one GPU); > 0 runs the model on CUDA.")
    max_batch_size: int = Field(
        32, ge=1, description="Dynamic batching: items (texts, images, records) of concurrent requests embedded in one forward.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, description="Dynamic batching: how long the first waiting item waits for others to fill a batch.")
    max_request_bytes: int = Field(
        16 * 2**20, ge=1, description="Larger request bodies are refused with HTTP 413 before they are parsed.")
    max_items: int = Field(256, ge=1, description="Most texts + images + records in one request (HTTP 413 beyond).")
    max_k: int = Field(1000, ge=1, description="Largest k of a /search request.")
    image_root: str | None = Field(
        None, description="Local folder whose files image URLs may name (path or file://); None = no local files, "
                          "only http(s):// and s3:// URLs and inline base64.")
    name: str = Field("gammaray", description="Ray Serve application name (one service per name on a cluster).")


# --------------------------------------------------------------------------------------------
# tuning (Ray Tune over the config tree; tuning/)


class SearchDim(Section):
    """One dimension of the search space, keyed in `tune.space` by the dotted path it sets."""

    kind: Literal["loguniform", "uniform", "randint", "choice"] = Field(
        ..., description="loguniform/uniform floats in [low, high], randint integers in [low, high), choice of values."
    )
    low: float | None = Field(None, description="Lower bound (loguniform: > 0).")
    high: float | None = Field(None, description="Upper bound.")
    values: list[Any] | None = Field(None, description="choice: the candidate values (non-empty).")
    zero: bool = Field(
        False, description="loguniform: also try exactly 0 (a regularizer switched off), through a boolean "
                           "search variable '<path>#zero'."
    )

    @model_validator(mode="after")
    def _well_formed(self) -> "SearchDim":
        if self.kind == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None or self.zero:
                raise ValueError("choice takes 'values' only (no low/high/zero)")
            return self
        if self.values is not None:
            raise ValueError(f"{self.kind} takes low/high, not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.kind} needs both 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"{self.kind} needs low < high (got low={self.low}, high={self.high})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs 0 < low (got low={self.low}); use zero: true to also try 0")
        if self.zero and self.kind != "loguniform":
            raise ValueError("zero: true is for loguniform dimensions")
        if self.kind == "randint" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("randint needs integer low and high")
        return self


def _default_space() -> dict[str, "SearchDim"]:
    weight = dict(kind="loguniform", low=1e-3, high=1.0, zero=True)
    return {
        # lambda_sep pays from about 0.1 (docs/benchmarks.md, the latent-structure forms); below, it is noise
        "loss.structure.lambda_sep": SearchDim(kind="loguniform", low=0.1, high=1.0, zero=True),
        "loss.structure.lambda_br": SearchDim(**weight),
        "loss.structure.lambda_gc": SearchDim(**weight),
        "loss.structure.bridge_t": SearchDim(kind="uniform", low=0.1, high=0.9),
        "model.temperature": SearchDim(kind="loguniform", low=0.02, high=0.2),
        "loss.gamma.alpha": SearchDim(kind="uniform", low=0.5, high=2.0),
        "loss.gamma.gamma": SearchDim(kind="loguniform", low=0.02, high=1.0),
    }


class AshaConfig(Section):
    grace_period: int | None = Field(
        None, ge=1, description="Steps every trial runs before it can be stopped (None = from grace_fraction)."
    )
    grace_fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Grace period as a fraction of a trial's budget, rounded up to a multiple of train.eval_every "
                    "(the steps that report a metric). None = 0.5 when tune.space holds a loss.structure weight "
                    "(regularizers act slowly: at a quarter of the run they are not yet told from noise), else "
                    "train.eval_every. tune.asha.grace_period, when set, wins.",
    )
    keep_front: bool = Field(
        True, description="Multi-objective searches (tune.objectives): a trial that ASHA would stop at a rung on "
                          "tune.metric continues when its (metric, second objective) pair is on the Pareto front of "
                          "the pairs recorded at that rung (a regularizer that buys the second objective with a "
                          "little R@1 is not cut for the trade it makes)."
    )
    reduction_factor: float = Field(2.0, gt=1.0, description="Keep the top 1/reduction_factor at each rung.")
    max_steps: int | None = Field(
        None, ge=1, description="Budget of a trial in optimizer steps (None = the trial's planned steps)."
    )


class PickConfig(Section):
    """How one configuration is picked from a multi-objective search's Pareto front (tuning/objectives.py)."""

    margin: float = Field(
        0.005, ge=0.0, description="The smallest drop of the first objective (R@1) that matters. With confirm_seeds=0 "
                                   "the rule on single runs: the picked trial's first objective may be at most this "
                                   "much below the baseline trial's (tune.points_to_evaluate[0]). With confirmation, "
                                   "the resolution the validation split is checked against (a warning when the "
                                   "binomial standard error of R@1 there is larger)."
    )
    confirm_seeds: int = Field(
        3, ge=0, description="Before the pick, the Pareto front's trials (at most confirm_candidates) and the baseline "
                             "train again with this many fresh seeds (run.seed+1 ...) and are compared on the means "
                             "and standard errors of their validation objectives: single runs differ by noise. "
                             "0 = pick on the search's single runs with the fixed margin. 1 is refused (no spread)."
    )
    confirm_candidates: int = Field(
        4, ge=1, description="At most this many front trials are confirmed: those with the highest second objective."
    )
    margin_se: float = Field(
        1.0, ge=0.0, description="With confirmation: a trial qualifies when its mean first objective is at least the "
                                 "baseline's minus margin_se standard errors of the difference."
    )
    gain_se: float = Field(
        1.0, ge=0.0, description="With confirmation: a qualifying trial is picked over the baseline only when its mean "
                                 "second objective beats the baseline's by more than gain_se standard errors of the "
                                 "difference (the highest such mean wins); otherwise the baseline."
    )

    @field_validator("confirm_seeds")
    @classmethod
    def _seeds_give_a_spread(cls, v: int) -> int:
        if v == 1:
            raise ValueError("confirm_seeds=1 measures no spread: use 0 (no confirmation) or at least 2")
        return v


class TuneSection(Section):
    name: str | None = Field(
        None, description="Experiment name under run.storage (None = '<run.name>-tune'); re-running it resumes."
    )
    space: dict[str, SearchDim] = Field(
        default_factory=_default_space,
        description="Search space: dotted config path -> {kind, low, high | values, zero}. Any path of the tree.",
    )
    samples: int = Field(8, ge=1, description="Number of trials.")
    metric: str = Field(
        "val_r_at_1", description="Metric the scheduler compares at its rungs and a single-objective searcher maximises "
                                  "(mode max)."
    )
    objectives: list[str] = Field(
        default_factory=list,
        description="Two validation metrics for a multi-objective search, both maximised, e.g. [val_r_at_1, "
                    "val_probe_specific] (Optuna's multi-objective TPE; ASHA still uses tune.metric). Writes the "
                    "Pareto front and the config tune.pick picks. Empty = single objective tune.metric."
    )
    pick: PickConfig = PickConfig()
    trial_kind: Literal["train_loop", "in_process"] = Field(
        "train_loop", description="train_loop: each trial is a TorchTrainer run of the training loop (gammaray pretrain's "
                                  "code, DeepSpeed, Ray Data). in_process: the trial trains in its own process "
                                  "(workers/training/inprocess.py: same model, objective, optimizer and schedule, "
                                  "data in memory, no checkpoints) on tune.trial_cpus CPUs: for small models, far "
                                  "cheaper per trial."
    )
    searcher: Literal["optuna", "random"] = Field(
        "optuna", description="optuna: Optuna's TPE sampler through ray.tune.search.optuna; random: plain sampling."
    )
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop weak trials early; fifo: run all fully.")
    asha: AshaConfig = AshaConfig()
    seed: int | None = Field(None, description="Searcher seed (None = run.seed).")
    trial_cpus: float = Field(
        0.25, gt=0.0, description="Logical CPUs of each trial's own process (it drives the TorchTrainer; 0 is refused)."
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Trials at once (None = as many as the cluster fits, leaving CPUs for Ray Data)."
    )
    trial_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides for the trials only (e.g. a shorter train.max_steps); not in the best config.",
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Trials to run first, before the searcher proposes its own: {searched path: value}; a searched "
                    "key left out takes the base config's value ([{}] = the base config as a baseline).",
    )

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("tune.name must be a non-empty path-safe string without '/'")
        return v

    @field_validator("space")
    @classmethod
    def _space_paths(cls, v: dict[str, SearchDim]) -> dict[str, SearchDim]:
        for path in v:
            check_path(path)  # names the bad key: "loss.structure.lamda_sep: unknown key ..."
        return v

    @field_validator("trial_overrides")
    @classmethod
    def _override_paths(cls, v: dict[str, Any]) -> dict[str, Any]:
        for path in v:
            check_path(path)
        return v


class GammarayConfig(Section):
    run: RunSection = RunSection()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneSection = TuneSection()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "GammarayConfig":
        d, st = self.data, self.loss.structure
        if d.view_pair == "text_text" and not d.pair_locale:
            raise ValueError("data.view_pair=text_text needs data.pair_locale (the locale of the second title)")
        if d.view_pair != "image_text" and st.in_modal_active():
            raise ValueError(f"loss.structure regularizers need data.view_pair=image_text, got {d.view_pair}")
        image_cfg_size = self.model.image.hf_config.get("image_size")
        if image_cfg_size is not None and image_cfg_size != self.data.image_size:
            raise ValueError(
                f"model.image.hf_config.image_size={image_cfg_size} differs from data.image_size={self.data.image_size}"
            )
        if d.features.train or d.features.val:
            m = self.model
            if not (m.image.fully_locked and m.text.fully_locked):
                raise ValueError("data.features (cached tower features) needs model.image.locked and model.text.locked "
                                 "with unlocked_layers 0: a tower that trains cannot be cached")
            if m.kind != "two_tower" or d.view_pair != "image_text":
                raise ValueError("data.features: cached features train a two_tower model on the image_text pair")
            if st.in_modal_active() or st.lambda_sep > 0 or st.lambda_br > 0 or st.lambda_gc > 0:
                raise ValueError("data.features: the structure regularizers need augmented views, which cached "
                                 "features do not have (set loss.structure weights to 0 and in_modal to auto or "
                                 "false)")
        # deep feature separation needs the specific heads: resolve model.specific_heads=None from it
        self.model._sep_active = self.loss.structure.lambda_sep > 0
        if self.loss.structure.lambda_sep > 0 and self.model.specific_heads is False:
            raise ValueError("loss.structure.lambda_sep > 0 needs model.specific_heads (set it to true or null)")
        return self


# --------------------------------------------------------------------------------------------
# loading and overriding


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif not e["loc"]:  # a check across sections: its message names the keys; the input is the whole tree
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def from_dict(data: Mapping[str, Any]) -> GammarayConfig:
    try:
        return GammarayConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load(path: str | os.PathLike | None = None, overrides: list[str] | Mapping[str, Any] | None = None) -> GammarayConfig:
    """Load a YAML file (or the embedded defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        with open(p) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    cfg = from_dict(data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML, so 2 is int, 0.5 float, [1,2] a list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like dotted.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty path")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def check_path(path: str) -> None:
    """Raise ConfigError naming `path` if it does not address a field of the tree."""
    model: Any = GammarayConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            # dict-valued fields (hf_config) accept any sub-key
            if model is dict or getattr(model, "__origin__", None) is dict:
                return
            raise ConfigError(f"{path}: '{'.'.join(parts[:i])}' is a value, it has no key '{part}'")
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            where = ".".join(parts[:i]) or "<root>"
            msg = f"{path}: unknown key '{part}' in {where}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            raise ConfigError(msg)
        ann = fields[part].annotation
        model = _section_type(ann)


def _section_type(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    origin = getattr(ann, "__origin__", None)
    if origin is dict or ann is dict:
        return dict
    return None


def apply_overrides(cfg: GammarayConfig, overrides: list[str] | Mapping[str, Any]) -> GammarayConfig:
    items = overrides.items() if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    data = cfg.model_dump(mode="python")
    for key, value in items:
        key = canonical_path(key)
        check_path(key)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(data)


def get_value(cfg: GammarayConfig, path: str) -> Any:
    """The value at a dotted path (the reverse of `apply_overrides`); ConfigError names a path that
    addresses nothing."""
    path = canonical_path(path)
    check_path(path)
    node: Any = cfg
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                raise ConfigError(f"{path}: no key '{part}' in this config's value")
            node = node[part]
        else:
            node = getattr(node, part)
    return node


def to_yaml(cfg: GammarayConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save(cfg: GammarayConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(to_yaml(cfg))


def describe(model: type[BaseModel] = GammarayConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted path, default, description) for every leaf: the documented config reference."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            rows.extend(describe(sub, prefix=f"{path}."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((path, repr(default), field.description or ""))
    return rows
