"""storage.*, run.*, ray.*: where a run keeps its files and what Ray it uses."""

from __future__ import annotations


from pydantic import Field, field_validator, model_validator

from .base import Section


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


