"""The search space of `tune.space`: dotted config paths -> Ray Tune domains, and back.

A dimension keyed by a dotted path (any key of the config tree) becomes one Tune search variable of
the same name; a log-uniform weight with `zero: true` gets a second, boolean variable
`<path>#zero` that switches the term off (the weight is then exactly 0). A trial's config is the
base config with `effective(params)` applied as dotted overrides, so the search works for any key,
whether or not the code behind it does anything yet.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from gammaray.config import ConfigError, GammarayConfig, SearchDim, apply_overrides, check_path, get_value

ZERO_SUFFIX = "#zero"

# paths that decide where a trial runs and what resources it takes: tuning them would break the
# resource plan (trials x workers) or the experiment layout
FORBIDDEN_PREFIXES = ("tune", "ray", "run.name", "run.storage", "storage", "train.workers",
                      "train.cpus_per_worker", "train.use_gpu")


def validate(cfg: GammarayConfig) -> None:
    """Reject a search space that cannot work, before any trial starts, naming the bad key.

    The config tree already checked that every path exists and that every dimension is well formed
    (bounds ordered, log bounds positive, choices non-empty). Here each bound and choice is also
    applied to the base config, so a value the field itself refuses (a negative weight, a bridge t
    of 1, a string for a float) is caught now instead of failing inside a trial."""
    t = cfg.tune
    if not t.space:
        raise ConfigError("tune.space: the search space is empty; declare at least one dotted path")
    base = cfg
    if t.trial_overrides:
        base = _apply(cfg, dict(t.trial_overrides), "tune.trial_overrides")
    for path, dim in t.space.items():
        key = f"tune.space.{path}"
        check_path(path)
        if any(path == p or path.startswith(p + ".") for p in FORBIDDEN_PREFIXES):
            raise ConfigError(f"{key}: this key sets where or on what a trial runs and cannot be searched")
        if path in t.trial_overrides:
            raise ConfigError(f"{key}: also set in tune.trial_overrides; a key is either searched or fixed")
        for name, value in _probe_values(dim):
            try:
                apply_overrides(base, {path: value})
            except ConfigError as err:
                detail = str(err).replace("invalid config:\n  ", "")
                raise ConfigError(f"{key}: {name}={value!r} is not a valid value: {detail}") from None
    start_points(cfg)  # raises naming tune.points_to_evaluate[i].<path>
    if t.metric != "val_r_at_1" and not t.metric.startswith("val_"):
        raise ConfigError(f"tune.metric: {t.metric!r} is not a validation metric (val_...) reported by the loop")
    if t.objectives:
        if len(t.objectives) != 2 or len(set(t.objectives)) != 2:
            raise ConfigError(f"tune.objectives: give two different validation metrics (the pick rule holds the first "
                              f"near the baseline's and maximises the second), got {t.objectives}")
        for m in t.objectives:
            if not m.startswith("val_"):
                raise ConfigError(f"tune.objectives: {m!r} is not a validation metric (val_...) reported by the loop")
            if m.startswith("val_probe_") and not trial_config(cfg, {}).eval.specific_attributes:
                raise ConfigError(f"tune.objectives: {m} needs eval.specific_attributes (the attributes only one "
                                  f"modality carries, e.g. {{image: [pattern, size], text: [care, warranty]}})")
        if not t.points_to_evaluate:
            raise ConfigError("tune.objectives: the pick rule compares with a baseline trial, tune.points_to_evaluate[0]"
                              "; add one (e.g. [{}] = the base config's values)")
    trial = trial_config(cfg, {})
    if trial.data.features.train and not trial.data.features.val:
        raise ConfigError("data.features.val: heads trials rank by validation R@1; point it at the feature store of a "
                          "held-out catalogue (gammaray embed --features)")
    if not trial.data.val and not trial.data.features.train:
        raise ConfigError("data.val: Ray Tune ranks trials by validation R@1; point data.val at a held-out catalogue")


def _apply(cfg: GammarayConfig, overrides: dict[str, Any], where: str) -> GammarayConfig:
    try:
        return apply_overrides(cfg, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _probe_values(dim: SearchDim) -> list[tuple[str, Any]]:
    if dim.kind == "choice":
        return [(f"values[{i}]", v) for i, v in enumerate(dim.values or [])]
    if dim.kind == "randint":
        return [("low", int(dim.low)), ("high-1", int(dim.high) - 1)]
    probes: list[tuple[str, Any]] = [("low", dim.low), ("high", dim.high)]
    if dim.zero:
        probes.append(("zero", 0.0))
    return probes


def param_space(space: Mapping[str, SearchDim]) -> dict[str, Any]:
    """Flat Tune param space keyed by dotted path (Tune and Optuna take '.' in names as is)."""
    from ray import tune

    out: dict[str, Any] = {}
    for path, dim in space.items():
        if dim.kind == "loguniform":
            out[path] = tune.loguniform(dim.low, dim.high)
            if dim.zero:
                out[path + ZERO_SUFFIX] = tune.choice([False, True])
        elif dim.kind == "uniform":
            out[path] = tune.uniform(dim.low, dim.high)
        elif dim.kind == "randint":
            out[path] = tune.randint(int(dim.low), int(dim.high))
        else:
            out[path] = tune.choice(list(dim.values or []))
    return out


def start_points(cfg: GammarayConfig) -> list[dict[str, Any]]:
    """tune.points_to_evaluate as Tune params: every searched key given (left-out keys take the
    base config's value), a weight of 0 expressed through its `#zero` switch."""
    out = []
    space = cfg.tune.space
    for i, point in enumerate(cfg.tune.points_to_evaluate):
        where = f"tune.points_to_evaluate[{i}]"
        for path in point:
            if path not in space:
                raise ConfigError(f"{where}.{path}: not a searched key (tune.space has: {', '.join(space)})")
        params: dict[str, Any] = {}
        for path, dim in space.items():
            value = point[path] if path in point else get_value(cfg, path)
            key = f"{where}.{path}"
            if path in point:
                try:
                    apply_overrides(cfg, {path: value})
                except ConfigError as err:
                    detail = str(err).replace("invalid config:\n  ", "")
                    raise ConfigError(f"{key}: {value!r} is not a valid value: {detail}") from None
            if dim.kind == "choice":
                if value not in (dim.values or []):
                    raise ConfigError(f"{key}: {value!r} is not one of the choices {dim.values}")
                params[path] = value
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{key}: {value!r} is not a number")
            if dim.zero:
                params[path + ZERO_SUFFIX] = value == 0
                if value == 0:
                    params[path] = float(dim.low)
                    continue
            hi_ok = value < dim.high if dim.kind == "randint" else value <= dim.high
            if not (dim.low <= value and hi_ok):
                given = "" if path in point else " (the base config's value; give one in the range)"
                raise ConfigError(f"{key}: {value!r} is outside [{dim.low}, {dim.high}]{given}")
            params[path] = int(value) if dim.kind == "randint" else float(value)
        out.append(params)
    return out


def effective(params: Mapping[str, Any], space: Mapping[str, SearchDim]) -> dict[str, Any]:
    """The config values a trial trains with: switches applied, helper variables dropped."""
    out: dict[str, Any] = {}
    for path, dim in space.items():
        if path not in params:
            continue
        value = params[path]
        if dim.zero and bool(params.get(path + ZERO_SUFFIX, False)):
            value = 0.0
        if dim.kind in ("loguniform", "uniform") and value is not None:
            value = float(value)
        elif dim.kind == "randint":
            value = int(value)
        out[path] = value
    return out


def trial_config(base: GammarayConfig, values: Mapping[str, Any]) -> GammarayConfig:
    """Base config + tune.trial_overrides + the trial's values; validation R@1 every eval_every steps."""
    cfg = apply_overrides(base, {**base.tune.trial_overrides, **values})
    if cfg.train.eval_every is None:
        cfg = apply_overrides(cfg, {"train.eval_every": cfg.train.log_every})
    return cfg


def is_log(dim: SearchDim) -> bool:
    return dim.kind == "loguniform" or (dim.kind == "choice" and _all_positive_numbers(dim.values)
                                        and _spread(dim.values) >= 100)


def _all_positive_numbers(values: list | None) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


def _spread(values: list) -> float:
    return max(values) / min(values) if values else 1.0


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        if abs(value) >= 1e-2 and abs(value) < 1e4:
            return f"{value:.3g}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return str(value)
    return str(value)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
