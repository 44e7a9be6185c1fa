"""model.*: the towers, the fusion encoder and the shared head."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr

from .base import Section


# --------------------------------------------------------------------------------------------
# model


def _default_image_tower() -> dict[str, Any]:
    # a small ResNet learns shapes from a few thousand images on CPU; a ViT this small does not
    return {
        "model_type": "resnet",
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128],
        "depths": [1, 1, 1],
        "layer_type": "basic",
    }


def _default_text_tower() -> dict[str, Any]:
    return {
        "model_type": "bert",
        "hidden_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 192,
        "max_position_embeddings": 64,
    }


class TowerConfig(Section):
    pretrained: str | None = Field(None, description="Local Hugging Face folder to initialise from.")
    hf_config: dict[str, Any] = Field(
        default_factory=dict, description="transformers config kwargs (model_type + sizes) for random init."
    )
    pooling: Literal["auto", "cls", "mean"] = Field("auto", description="How the tower's tokens become one vector.")
    locked: bool = Field(
        False, description="Freeze the tower (LiT; open_clip's --lock-image/--lock-text): no gradient, not in the "
                           "optimizer or its checkpointed state, always in eval mode (BatchNorm statistics and dropout "
                           "frozen). A fully locked tower's pooled features can be cached (`gammaray embed --features`)."
    )
    unlocked_layers: int = Field(
        0, ge=0, description="With locked: keep the tower's last N blocks (and the layers after them: final norm, "
                             "pooler, head convolution) trainable (open_clip's --lock-*-unlocked-groups)."
    )

    @property
    def fully_locked(self) -> bool:
        return self.locked and self.unlocked_layers == 0


class FusionConfig(Section):
    """The ALBEF-style fusion model (model.kind=fusion): a cross-attention encoder over the unimodal
    towers' tokens, trained by image-text matching with hard negatives; momentum (EMA) copies of the
    unimodal encoders give the augmented features of the structure regularizers."""

    layers: int = Field(2, ge=1, description="Cross-attention fusion layers (transformers Bert blocks).")
    heads: int | None = Field(None, ge=1, description="Attention heads of the fusion layers (None = the text tower's).")
    intermediate_size: int | None = Field(
        None, ge=1, description="Feed-forward width of the fusion layers (None = the text tower's, else 4x width)."
    )
    itm_weight: float = Field(
        1.0, ge=0.0, description="Weight of the image-text matching loss (0 = no ITM compute; the fusion encoder is then unused)."
    )
    momentum: float = Field(
        0.995, ge=0.0, lt=1.0, description="EMA coefficient of the momentum encoders (updated once per training forward)."
    )


class ModelConfig(Section):
    kind: Literal["two_tower", "fusion"] = Field(
        "two_tower", description="Model family: two_tower (CLIP-style) or fusion (ALBEF-style, see model.fusion)."
    )
    embed_dim: int = Field(64, ge=2, description="Dimension of the shared embedding space.")
    image: TowerConfig = TowerConfig(hf_config=_default_image_tower())
    text: TowerConfig = TowerConfig(hf_config=_default_text_tower(), pooling="mean")
    temperature: float = Field(0.1, gt=0.0, description="Initial temperature tau.")
    learn_temperature: bool = Field(True, description="Learn tau (as a log-scale) or keep it fixed.")
    max_logit_scale: float = Field(100.0, gt=0.0, description="Upper clamp of 1/tau.")
    specific_heads: bool | None = Field(
        None, description="Extra projection heads for modality-specific features (deep feature separation), exported "
                          "beside the shared ones. None = present exactly when loss.structure.lambda_sep > 0."
    )
    specific_dim: int | None = Field(None, ge=2, description="Dimension of the modality-specific features (None = embed_dim).")
    fusion: FusionConfig = FusionConfig()

    # resolved by GammarayConfig from loss.structure.lambda_sep (not part of the dumped tree)
    _sep_active: bool = PrivateAttr(False)

    def has_specific_heads(self) -> bool:
        return self.specific_heads if self.specific_heads is not None else self._sep_active


