"""The Ray cluster a command runs on: starting (or joining) Ray, this process's node, and the
config keys set to "auto", resolved from the cluster's resources.

Ray is imported inside the functions that need it: importing this module costs no Ray import.

"auto" keys. One config runs unchanged on a laptop, one GPU node or N GPU nodes. Three keys may say
"auto"; `pretrain` resolves them once, after connecting to Ray and before building the trainer, and
the resolved values are what the run records (checkpoint config.json, metrics):

| key | "auto" becomes |
|---|---|
| `train.workers` | with `train.use_gpu`: one worker per GPU in the cluster; on CPU: one worker per node that has CPUs (torch uses the node's cores inside the worker). Bounded by `ray.auto.min_workers` / `ray.auto.max_workers`. |
| `data.batch_size` | per-worker micro-batch `ceil(ray.auto.global_batch_size / workers)`, clamped to `[ray.auto.min_micro_batch, ray.auto.max_micro_batch]`: the global batch (and so the steps per epoch and the LR schedule) stays the same when the worker count changes, as long as the clamp allows. |
| `data.preprocess_concurrency` | the cluster's logical CPUs left after the training workers (`workers x train.cpus_per_worker`), divided among the workers' Ray Data pipelines in tasks of `data.preprocess_num_cpus`, at least 1. |

Keys given as numbers are never touched. The resolution is a pure function of (config, resources)
plus a thin reader of `ray.cluster_resources()` / `ray.nodes()`; it imports Ray only there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


from gammaray.config import ConfigError, GammarayConfig, apply_overrides
from pipelines.ray_start import private_tmpdir_for_ray


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
# starting Ray


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
