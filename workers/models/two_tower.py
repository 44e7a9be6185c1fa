"""Encoders: transformers towers plus projection heads into one unit-norm embedding space.

The towers are ordinary Hugging Face models (a tiny random config in tests and the demo, any local
pretrained folder otherwise), so an exported model loads with transformers alone.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gammaray.config import ModelConfig, TowerConfig
from gammaray.schema import BatchKeys as K


def build_tower(cfg: TowerConfig, **overrides: Any) -> nn.Module:
    # transformers (seconds to import) loads when a tower is built, not when the model code is imported
    from transformers import AutoConfig, AutoModel

    from workers.models.hf_efficientnet_lite import register

    register()  # model types gammaray adds to transformers (EfficientNet-Lite)
    if cfg.pretrained:
        if not os.path.isdir(cfg.pretrained):
            raise FileNotFoundError(f"pretrained tower folder not found: {cfg.pretrained} (a local Hugging Face "
                                    "folder; no model hub is reached)")
        return AutoModel.from_pretrained(cfg.pretrained)
    kwargs = dict(cfg.hf_config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ValueError("tower hf_config needs a 'model_type' (e.g. 'vit', 'bert') or set 'pretrained'")
    kwargs.update(overrides)
    hf_cfg = AutoConfig.for_model(model_type, **kwargs)
    return AutoModel.from_config(hf_cfg)


def tower_width(tower: nn.Module) -> int:
    c = tower.config
    for name in ("projection_dim", "hidden_size", "dim", "d_model"):
        if getattr(c, name, None):
            return int(getattr(c, name))
    sizes = getattr(c, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ValueError(f"cannot infer the output width of {type(tower).__name__}")


def pool(output: Any, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector per example. auto: the model's pooler if it has one, else masked mean of tokens."""
    pooled = getattr(output, "pooler_output", None)
    if how == "auto" and pooled is not None:
        return pooled.flatten(1)
    hidden = output.last_hidden_state
    if hidden.dim() == 4:  # conv feature map [B, C, H, W]
        return hidden.mean(dim=(2, 3))
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def tower_blocks(tower: nn.Module) -> nn.ModuleList | None:
    """The tower's main stack of blocks (BERT's encoder.layer, ResNet's stages, EfficientNet's
    blocks): the ModuleList that holds the most parameters."""
    best, best_n = None, 0
    for m in tower.modules():
        if isinstance(m, nn.ModuleList) and len(m):
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = m, n
    return best


def lock_tower(tower: nn.Module, unlocked_layers: int = 0, name: str = "tower") -> None:
    """Freeze a tower except its last `unlocked_layers` blocks and every parameter registered after
    them (final norm, pooler, head convolution: transformers models register parameters in forward
    order)."""
    params = list(tower.parameters())
    for p in params:
        p.requires_grad_(False)
    if unlocked_layers <= 0:
        return
    blocks = tower_blocks(tower)
    if blocks is None or unlocked_layers > len(blocks):
        have = 0 if blocks is None else len(blocks)
        raise ValueError(f"model.{name}.unlocked_layers={unlocked_layers}, but the {name} tower "
                         f"({type(tower).__name__}) has {have} blocks")
    first = next(blocks[len(blocks) - unlocked_layers].parameters())
    start = next(i for i, p in enumerate(params) if p is first)
    for p in params[start:]:
        p.requires_grad_(True)


def set_train_modes(module: nn.Module, mode: bool) -> None:
    """train(mode) where a sub-module with trainable parameters exists, eval() where every parameter is
    frozen (a locked tower's BatchNorm statistics and dropout stay fixed); a parameter-less module
    (dropout, activation) follows its parent."""
    for child in module.children():
        params = list(child.parameters())
        child.train(mode and (any(p.requires_grad for p in params) if params else module.training))
        set_train_modes(child, mode)


class _ClampAbove(torch.autograd.Function):
    """min(x, hi) whose gradient still flows where descent would lower x: past the cap a loss that
    wants a smaller x can bring it back (x.clamp(max=hi) would zero that gradient for good), one that
    wants a larger x gets no push."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, hi: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.hi = hi
        return x.clamp(max=hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * ((x <= ctx.hi) | (grad > 0)).to(grad.dtype), None


def clamp_above(x: torch.Tensor, hi: float) -> torch.Tensor:
    return _ClampAbove.apply(x, hi)


def tower_tokens(output: Any) -> torch.Tensor:
    """Token features [B, N, D] of a tower's output (a conv feature map becomes its H*W positions)."""
    hidden = output.last_hidden_state
    if hidden.dim() == 4:
        return hidden.flatten(2).transpose(1, 2)
    return hidden


def sdpa_ready_mask(tower: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """The [B, L] padding mask as the 4-D boolean mask an SDPA transformer builds from it. Given the
    2-D mask, transformers reads `mask.all()` on the host every forward (to skip an all-ones mask):
    a GPU synchronisation per step. A ready 4-D mask is used as it is."""
    if getattr(getattr(tower, "config", None), "_attn_implementation", None) != "sdpa" or attention_mask.dim() != 2:
        return attention_mask
    L = attention_mask.shape[1]
    return attention_mask.bool()[:, None, None, :].expand(-1, 1, L, L)


class TwoTowerModel(nn.Module):
    """CLIP-style: image tower + text tower, linear projections, learnable temperature.

    With `cfg.has_specific_heads()` two more linear heads give modality-specific features
    (`image_specific`, `text_specific`, unit-norm) from the same pooled tower outputs, for deep
    feature separation; they are exported with the shared heads."""

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None, pad_token_id: int | None = None,
                 feature_widths: tuple[int, int] | None = None):
        """`feature_widths=(image, text)`: a heads-only model for cached tower features (no tower is
        built; `forward` then needs image_features/text_features in the batch)."""
        super().__init__()
        self.cfg = cfg
        text_overrides = {}
        if not cfg.text.pretrained:
            if vocab_size is not None:
                text_overrides["vocab_size"] = vocab_size
            if pad_token_id is not None:
                text_overrides["pad_token_id"] = pad_token_id
        if feature_widths is None:
            self.image_tower = build_tower(cfg.image)
            self.text_tower = build_tower(cfg.text, **text_overrides)
            widths = (tower_width(self.image_tower), tower_width(self.text_tower))
            for name, tower, tcfg in (("image", self.image_tower, cfg.image), ("text", self.text_tower, cfg.text)):
                if tcfg.locked:
                    lock_tower(tower, tcfg.unlocked_layers, name)
        else:
            self.image_tower = self.text_tower = None
            widths = tuple(int(w) for w in feature_widths)
        self.image_proj = nn.Linear(widths[0], cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(widths[1], cfg.embed_dim, bias=False)
        # shape (1,), not (): DeepSpeed 0.19 cannot partition 0-dim parameters across ranks
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature)),
                                            requires_grad=cfg.learn_temperature)
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))  # used by SigLIP only
        self.specific = cfg.has_specific_heads()
        if self.specific:
            dim = cfg.specific_dim or cfg.embed_dim
            self.image_specific_proj = nn.Linear(widths[0], dim, bias=False)
            self.text_specific_proj = nn.Linear(widths[1], dim, bias=False)
        self.train()  # a module starts in train mode: put the locked towers' parts in eval mode now

    def train(self, mode: bool = True) -> "TwoTowerModel":
        super().train(mode)
        for tower, tcfg in ((self.image_tower, self.cfg.image), (self.text_tower, self.cfg.text)):
            if tower is not None and tcfg.locked:
                tower.train(mode and tcfg.unlocked_layers > 0)
                set_train_modes(tower, mode)
        return self

    @staticmethod
    def _no_grad_if(locked: bool):
        # a fully locked tower keeps no activations for a backward pass
        return torch.no_grad() if locked else contextlib.nullcontext()

    # pooled tower features (before any head)
    def image_features(self, pixel_values: torch.Tensor, tower: nn.Module | None = None) -> tuple[torch.Tensor, Any]:
        dtype = next(self.image_proj.parameters()).dtype
        with self._no_grad_if(tower is None and self.cfg.image.fully_locked):
            out = (tower or self.image_tower)(pixel_values=pixel_values.to(dtype))
            return pool(out, None, self.cfg.image.pooling), out

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      tower: nn.Module | None = None) -> tuple[torch.Tensor, Any]:
        t = tower or self.text_tower
        with self._no_grad_if(tower is None and self.cfg.text.fully_locked):
            out = t(input_ids=input_ids, attention_mask=sdpa_ready_mask(t, attention_mask))
            return pool(out, attention_mask, self.cfg.text.pooling), out

    @staticmethod
    def head(proj: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(proj(h).float(), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_proj, self.image_features(pixel_values)[0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.text_proj, self.text_features(input_ids, attention_mask)[0])

    def logit_scale(self) -> torch.Tensor:
        return clamp_above(self.log_logit_scale.float(), math.log(self.cfg.max_logit_scale)).exp()

    def _embed(self, out: dict, key: str, h: torch.Tensor, modality: str, suffix: str = "") -> None:
        out[key + suffix] = self.head(getattr(self, f"{modality}_proj"), h)
        if self.specific:
            out[f"{key}_specific{suffix}"] = self.head(getattr(self, f"{modality}_specific_proj"), h)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings of every view present in the batch, plus the scalars the losses need.

        Everything a loss touches is produced here (ZeRO-3 only materialises parameters inside
        forward). Keys: image, text, image_aug, text_aug (augmented views, when the batch has them),
        and with specific heads image_specific, text_specific (+ _aug)."""
        out = {"logit_scale": self.logit_scale(), "logit_bias": self.logit_bias.float()}
        dtype = self.image_proj.weight.dtype
        # cached pooled features of locked towers (`gammaray embed --features`) stand in for the towers
        if K.IMAGE_FEATURES in batch:
            self._embed(out, "image", batch[K.IMAGE_FEATURES].to(dtype), "image")
        elif K.PIXELS in batch:
            self._embed(out, "image", self.image_features(batch[K.PIXELS])[0], "image")
        if K.TEXT_FEATURES in batch:
            self._embed(out, "text", batch[K.TEXT_FEATURES].to(dtype), "text")
        elif K.INPUT_IDS in batch:
            self._embed(out, "text", self.text_features(batch[K.INPUT_IDS], batch[K.ATTENTION_MASK])[0], "text")
        if K.PIXELS_AUG in batch:
            self._embed(out, "image", self.image_features(batch[K.PIXELS_AUG])[0], "image", "_aug")
        if K.INPUT_IDS_AUG in batch:
            h = self.text_features(batch[K.INPUT_IDS_AUG], batch[K.ATTENTION_MASK_AUG])[0]
            self._embed(out, "text", h, "text", "_aug")
        # the second view of the non-default view pairs (gammaray.schema.VIEW_PAIRS)
        if K.PIXELS_PAIR in batch:
            self._embed(out, "image", self.image_features(batch[K.PIXELS_PAIR])[0], "image", "_pair")
        if K.INPUT_IDS_PAIR in batch:
            h = self.text_features(batch[K.INPUT_IDS_PAIR], batch[K.ATTENTION_MASK_PAIR])[0]
            self._embed(out, "text", h, "text", "_pair")
        return out


