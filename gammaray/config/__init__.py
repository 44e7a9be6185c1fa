"""The one config tree.

Every component takes its own section of `GammarayConfig`. The same tree is loaded from YAML,
patched by dotted paths (`--set loss.gamma.alpha=2` on the CLI, a Ray Tune param space), and
validated before any cluster resource is used: unknown keys and wrong types are errors that name
the offending path.

One module per area: run.py (storage, run, ray), data.py, model.py, loss.py, train.py, use.py (eval,
tracking, serve), tune.py; tree.py holds GammarayConfig and the checks across sections; loader.py
loads, overrides and describes (docs/config-reference.md is generated from the descriptions). Import
from `gammaray.config`, not from the modules: the names below are the API.
"""

from .base import ConfigError, RunError, Section
from .data import AugmentConfig, DataConfig, FeatureStoreConfig
from .loader import (apply_overrides, check_path, describe, from_dict, get_value, load, parse_override, save,
                     to_yaml)
from .loss import GammaLossConfig, LossConfig, StructureConfig
from .model import FusionConfig, ModelConfig, TowerConfig
from .run import AutoScalingConfig, RayConfig, RunSection, StorageConfig
from .train import MOVED_KEYS, DeepSpeedSection, OptimConfig, TrainConfig, canonical_path, moved_key_warning
from .tree import GammarayConfig
from .tune import AshaConfig, PickConfig, SearchDim, TuneSection
from .use import EvalConfig, ServeConfig, TrackingConfig

__all__ = [
    "AshaConfig", "AugmentConfig", "AutoScalingConfig", "ConfigError", "DataConfig", "DeepSpeedSection",
    "EvalConfig", "FeatureStoreConfig", "FusionConfig", "GammaLossConfig", "GammarayConfig", "LossConfig",
    "MOVED_KEYS", "ModelConfig", "OptimConfig", "PickConfig", "RayConfig", "RunError", "RunSection", "SearchDim",
    "Section", "ServeConfig", "StorageConfig", "StructureConfig", "TowerConfig", "TrackingConfig", "TrainConfig",
    "TuneSection", "apply_overrides", "canonical_path", "check_path", "describe", "from_dict", "get_value", "load",
    "moved_key_warning", "parse_override", "save", "to_yaml",
]
