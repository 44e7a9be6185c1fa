"""Loading a tree (YAML, dicts), dotted-path overrides and lookups, the key reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from .base import ConfigError
from .train import canonical_path
from .tree import GammarayConfig, check_path, section_type


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
        sub = section_type(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            rows.extend(describe(sub, prefix=f"{path}."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((path, repr(default), field.description or ""))
    return rows
