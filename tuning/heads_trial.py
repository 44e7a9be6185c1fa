"""Ray Tune trials that train heads on cached tower features (`data.features.train` set).

A trial is a plain function trainable: the heads train in the trial's own process
(workers/training/heads.py: seconds to minutes on a CPU), reporting every validation evaluation to Tune, so
ASHA can stop weak trials. No TorchTrainer, no Ray Data: the features are read once per trial
(a few MB per thousand records). This is how each contrastive loss's own hyperparameters are tuned
at the same trial budget in `gammaray bench recipe`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gammaray.config import GammarayConfig, from_dict

from . import space

if TYPE_CHECKING:
    from pipelines.storage import Store


def budget_steps(cfg: GammarayConfig, num_records: int) -> int:
    """Optimizer steps of one trial: epochs x ceil(records / batch), capped by max_steps."""
    trial = space.trial_config(cfg, {})
    steps = trial.train.epochs * math.ceil(num_records / int(trial.data.batch_size))
    caps = [c for c in (trial.train.max_steps, cfg.tune.asha.max_steps) if c]
    return min([steps, *caps])


def num_records(cfg: GammarayConfig, store: Store) -> int:
    from pipelines import storage

    meta = store.read_json(storage.join(cfg.data.features.train.rstrip("/"), "_embed.json"))
    if meta.get("kind") != "features":
        raise ValueError(f"data.features.train={cfg.data.features.train} is not a feature store (gammaray embed --features)")
    from workers.evaluation.features import load_feature_store

    return len(load_feature_store(cfg.data.features.train, store, with_labels=False))


def run_heads_trial(params: dict, base: dict, store: Store) -> None:
    """The trainable: the base config with the trial's values, heads trained in this process."""
    import ray.tune
    import torch

    from workers.evaluation.features import load_feature_store
    from workers.training.heads import train_heads

    torch.set_num_threads(1)  # trials run side by side, one core each
    cfg0 = from_dict(base)
    cfg = space.trial_config(cfg0, space.effective(params, cfg0.tune.space))
    if cfg0.tune.asha.max_steps:
        steps = min(cfg.train.max_steps or cfg0.tune.asha.max_steps, cfg0.tune.asha.max_steps)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})
    train = load_feature_store(cfg.data.features.train, store)
    val = load_feature_store(cfg.data.features.val, store)
    train_heads(cfg, train, val, report=lambda m: ray.tune.report(dict(m)), diagnostics=False)
