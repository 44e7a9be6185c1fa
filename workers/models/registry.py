"""The model registry: `model.kind` -> model class, and the on-disk format every model is saved in and
loaded from (towers with save_pretrained, heads as plain tensors, gammaray_model.json). It imports
both model modules; they import nothing from here."""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from gammaray.config import ModelConfig, TowerConfig
from workers.models.fusion import FusionModel
from workers.models.two_tower import TwoTowerModel
from workers.safe_load import load as load_data

MODEL_FILE = "gammaray_model.json"


def build_model(cfg: ModelConfig, vocab_size: int | None = None, pad_token_id: int | None = None) -> nn.Module:
    if cfg.kind == "two_tower":
        return TwoTowerModel(cfg, vocab_size=vocab_size, pad_token_id=pad_token_id)
    if cfg.kind == "fusion":
        return FusionModel(cfg, vocab_size=vocab_size, pad_token_id=pad_token_id)
    raise ValueError(f"unknown model.kind {cfg.kind!r}")


# training-only state that an export leaves out (the fusion model's momentum encoders)
EXPORT_SKIP = ("image_tower.", "text_tower.", "momentum.")


def save_model(model: nn.Module, out_dir: str, model_cfg: ModelConfig, tokenizer=None) -> None:
    """Export: each tower with save_pretrained, the heads (shared and modality-specific), the
    temperature and, for the fusion model, the fusion encoder and ITM head as plain tensors."""
    os.makedirs(out_dir, exist_ok=True)
    model.image_tower.save_pretrained(os.path.join(out_dir, "image_tower"))
    model.text_tower.save_pretrained(os.path.join(out_dir, "text_tower"))
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(out_dir, "text_tower"))
    heads = {k: v.detach().cpu().float() for k, v in model.state_dict().items() if not k.startswith(EXPORT_SKIP)}
    torch.save(heads, os.path.join(out_dir, "heads.pt"))
    # the specific heads' presence is resolved from the loss config at training time: write it down
    resolved = model_cfg.model_copy(update={"specific_heads": bool(getattr(model, "specific", False))})
    with open(os.path.join(out_dir, MODEL_FILE), "w") as f:
        json.dump({"format": 1, "model": resolved.model_dump(mode="json")}, f, indent=2)


def load_model(model_dir: str) -> nn.Module:
    """Rebuild a model saved by `save_model` (towers from their folders, heads from heads.pt)."""
    with open(os.path.join(model_dir, MODEL_FILE)) as f:
        meta = json.load(f)
    cfg = ModelConfig.model_validate(meta["model"])
    cfg = cfg.model_copy(update={
        "image": TowerConfig(pretrained=os.path.join(model_dir, "image_tower"), pooling=cfg.image.pooling),
        "text": TowerConfig(pretrained=os.path.join(model_dir, "text_tower"), pooling=cfg.text.pooling),
    })
    model = build_model(cfg)
    heads = load_data(os.path.join(model_dir, "heads.pt"))  # data only: no pickled code runs
    missing, unexpected = model.load_state_dict(heads, strict=False)
    bad = [k for k in missing if not k.startswith(EXPORT_SKIP)]
    if bad or unexpected:
        raise ValueError(f"{model_dir}: heads do not match the model (missing {bad}, unexpected {unexpected})")
    if hasattr(model, "reset_momentum"):
        model.reset_momentum()
    return model
