"""eval.*, tracking.*, serve.*: using the encoder once it is trained."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


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


