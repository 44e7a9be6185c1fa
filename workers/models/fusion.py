"""ALBEF-style fusion model (Li et al., NeurIPS 2021), as used by the CVPR 2023 structure paper.

- Unimodal encoders: the same transformers towers and projection heads as the two-tower model, so the
  contrastive loss and the structure regularizers apply to the unimodal embeddings unchanged.
- A fusion encoder: `model.fusion.layers` blocks of self-attention over the text tower's tokens,
  cross-attention to the image tower's tokens and a feed-forward layer, each built from transformers'
  Bert building blocks (BertAttention, BertIntermediate, BertOutput).
- Image-text matching (ITM): a linear head on the fused [CLS] token says whether an (image, text)
  pair matches. Each image gets one negative text and each text one negative image, drawn with
  probability softmax(s_ij) over the contrastive similarities with the positive (and any other row of
  the same sample_index) masked out, so a hard negative is never the positive.
- Momentum encoders: EMA copies of the unimodal encoders and heads (no gradient). Their embeddings of
  the augmented views are the augmented features `image_aug` / `text_aug` (and `*_specific_aug`) that
  the in-modal terms and the regularizers use. The EMA update runs at the start of every training
  forward (as in ALBEF), so no hook in the training loop is needed; under ZeRO-3 it updates the local
  parameter partitions.

Everything a loss needs (ITM loss included) is computed inside `forward`: ZeRO-3 only materialises
parameters there.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from gammaray.config import ModelConfig
from gammaray.schema import BatchKeys as K
from workers.models.two_tower import TwoTowerModel, tower_tokens, tower_width


def sample_hard_negatives(sim: torch.Tensor, same: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i, draw a column j with probability softmax_j(sim_ij) over the columns with
    same[i, j] False. Returns (index, valid): index[i] = -1 and valid[i] = False where a row has no
    admissible column (a batch of one, or only duplicates of the positive).

    The masked columns get probability exactly 0 (masked before the softmax, so an overwhelming
    positive cannot underflow the negatives' probabilities to all-zero)."""
    sim = sim.detach().float()
    valid = (~same).any(dim=1)
    index = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
    if bool(valid.any()):
        logits = sim[valid].masked_fill(same[valid], float("-inf"))
        probs = torch.softmax(logits, dim=1)
        probs = probs.masked_fill(same[valid], 0.0)  # exact zeros (softmax of -inf already is)
        if generator is not None:
            picked = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(sim.device)
        else:
            picked = torch.multinomial(probs, 1).squeeze(1)
        index[valid] = picked
    return index, valid


def _bert_config(width: int, heads: int, intermediate: int, dropout: float):
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=intermediate,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    cfg._attn_implementation = "sdpa"
    return cfg


class FusionLayer(nn.Module):
    """Self-attention over text tokens, cross-attention to image tokens, feed-forward (post-LN),
    from transformers' Bert blocks (not causal: the self-attention is bidirectional)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

        self.self_attention = BertAttention(config, is_causal=False)
        self.cross_attention = BertAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, self_mask: torch.Tensor | None, image_tokens: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.self_attention(hidden, attention_mask=self_mask)[0]
        hidden = self.cross_attention(hidden, encoder_hidden_states=image_tokens,
                                      encoder_attention_mask=image_mask)[0]
        return self.output(self.intermediate(hidden), hidden)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1/0 -> [B, 1, 1, L] additive attention mask (0 keep, large negative drop)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class FusionEncoder(nn.Module):
    def __init__(self, text_width: int, image_width: int, layers: int, heads: int, intermediate: int,
                 dropout: float = 0.1):
        super().__init__()
        config = _bert_config(text_width, heads, intermediate, dropout)
        self.image_in = nn.Linear(image_width, text_width)
        self.layers = nn.ModuleList([FusionLayer(config) for _ in range(layers)])

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        img = self.image_in(image_tokens.to(self.image_in.weight.dtype))
        hidden = text_tokens.to(img.dtype)
        mask = additive_mask(text_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, mask, img)
        return hidden


class FusionModel(TwoTowerModel):
    """Two unimodal towers + a cross-attention fusion encoder with ITM + momentum encoders."""

    ONLINE = ("image_tower", "text_tower", "image_proj", "text_proj", "image_specific_proj", "text_specific_proj")

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None, pad_token_id: int | None = None):
        super().__init__(cfg, vocab_size=vocab_size, pad_token_id=pad_token_id)
        f = cfg.fusion
        tcfg = self.text_tower.config
        width = tower_width(self.text_tower)
        heads = f.heads or int(getattr(tcfg, "num_attention_heads", 0) or 1)
        if width % heads:
            raise ValueError(f"model.fusion.heads={heads} does not divide the text tower width {width}")
        inter = f.intermediate_size or int(getattr(tcfg, "intermediate_size", 0) or 4 * width)
        self.fusion = FusionEncoder(width, tower_width(self.image_tower), f.layers, heads, inter)
        self.itm_head = nn.Linear(width, 2)
        # momentum (EMA) copies of the unimodal encoders and heads: training state, never exported
        self.momentum = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in self.ONLINE
                                       if hasattr(self, name)})
        self.momentum.requires_grad_(False)

    # ---------------------------------------------------------------- momentum encoders

    def _pairs(self):
        for name, m_module in self.momentum.items():
            yield from zip(getattr(self, name).parameters(), m_module.parameters())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """m <- c m + (1 - c) online, parameter by parameter. Under ZeRO-3 a parameter outside its
        module's forward is an empty placeholder: the update then runs on the local partitions
        (`ds_tensor`), which have the same layout for the online and momentum copy of a parameter."""
        c = self.cfg.fusion.momentum
        for p, q in self._pairs():
            src, dst = getattr(p, "ds_tensor", None), getattr(q, "ds_tensor", None)
            if src is not None and dst is not None:
                dst.mul_(c).add_(src.to(dst.dtype), alpha=1.0 - c)
            else:
                q.data.mul_(c).add_(p.data.to(q.dtype), alpha=1.0 - c)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Momentum encoders := online encoders (parameters and buffers such as BatchNorm statistics)."""
        for p, q in self._pairs():
            q.data.copy_(p.data)
        for name, m_module in self.momentum.items():
            for a, b in zip(getattr(self, name).buffers(), m_module.buffers()):
                b.copy_(a)

    def _momentum_embed(self, out: dict, modality: str, h: torch.Tensor) -> None:
        m = self.momentum
        out[f"{modality}_aug"] = self.head(m[f"{modality}_proj"], h).detach()
        if self.specific:
            out[f"{modality}_specific_aug"] = self.head(m[f"{modality}_specific_proj"], h).detach()

    # ---------------------------------------------------------------- image-text matching

    def itm(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
            z_image: torch.Tensor, z_text: torch.Tensor, scale: torch.Tensor,
            sample_index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        B = z_image.shape[0]
        dev = z_image.device
        with torch.no_grad():
            sim = scale.detach().float() * z_image.detach().float() @ z_text.detach().float().T
            if sample_index is not None:
                same = sample_index.view(-1, 1) == sample_index.view(1, -1)
            else:
                same = torch.eye(B, dtype=torch.bool, device=dev)
            neg_text, valid_i = sample_hard_negatives(sim, same)        # a text for each image
            neg_image, valid_t = sample_hard_negatives(sim.T, same.T)   # an image for each text
        rows = torch.arange(B, device=dev)
        img_idx = torch.cat([rows, rows[valid_i], neg_image[valid_t]])
        txt_idx = torch.cat([rows, neg_text[valid_i], rows[valid_t]])
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=dev),
                            torch.zeros(int(valid_i.sum()) + int(valid_t.sum()), dtype=torch.long, device=dev)])
        fused = self.fusion(text_tokens[txt_idx], text_mask[txt_idx], image_tokens[img_idx])
        logits = self.itm_head(fused[:, 0]).float()
        loss = F.cross_entropy(logits, labels)
        return {"itm_loss": self.cfg.fusion.itm_weight * loss,
                "itm_accuracy": (logits.argmax(1) == labels).float().mean().detach(),
                "itm_negatives": torch.stack([neg_text, neg_image]).detach()}

    # ---------------------------------------------------------------- forward

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unimodal embeddings (as the two-tower model), momentum embeddings of the augmented views
        as `*_aug`, and in training the weighted ITM loss (`itm_loss`, `itm_accuracy`)."""
        if self.training and torch.is_grad_enabled():
            self.momentum_update()
        out = {"logit_scale": self.logit_scale(), "logit_bias": self.logit_bias.float()}
        image_tokens = text_tokens = None
        if K.PIXELS in batch:
            h, raw = self.image_features(batch[K.PIXELS])
            image_tokens = tower_tokens(raw)
            self._embed(out, "image", h, "image")
        if K.INPUT_IDS in batch:
            h, raw = self.text_features(batch[K.INPUT_IDS], batch[K.ATTENTION_MASK])
            text_tokens = tower_tokens(raw)
            self._embed(out, "text", h, "text")
        with torch.no_grad():
            if K.PIXELS_AUG in batch:
                h, _ = self.image_features(batch[K.PIXELS_AUG], tower=self.momentum["image_tower"])
                self._momentum_embed(out, "image", h)
            if K.INPUT_IDS_AUG in batch:
                h, _ = self.text_features(batch[K.INPUT_IDS_AUG], batch[K.ATTENTION_MASK_AUG],
                                          tower=self.momentum["text_tower"])
                self._momentum_embed(out, "text", h)
        if (self.training and self.cfg.fusion.itm_weight > 0 and image_tokens is not None
                and text_tokens is not None):
            itm = self.itm(image_tokens, text_tokens, batch[K.ATTENTION_MASK], out["image"], out["text"],
                           out["logit_scale"], batch.get(K.SAMPLE_INDEX))
            out["itm_loss"], out["itm_accuracy"] = itm["itm_loss"], itm["itm_accuracy"]
            self.last_itm_negatives = itm["itm_negatives"]
        return out
