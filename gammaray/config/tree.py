"""GammarayConfig: the whole tree, the checks that span sections, and the dotted paths into it."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, model_validator

from .base import ConfigError, Section
from .data import DataConfig
from .loss import LossConfig
from .model import ModelConfig
from .run import RayConfig, RunSection, StorageConfig
from .train import TrainConfig
from .tune import TuneSection
from .use import EvalConfig, ServeConfig, TrackingConfig


class GammarayConfig(Section):
    run: RunSection = RunSection()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneSection = TuneSection()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "GammarayConfig":
        # the search space and the trials' overrides name keys of the whole tree, so they are checked here
        for where, paths in (("tune.space", self.tune.space), ("tune.trial_overrides", self.tune.trial_overrides)):
            for path in paths:
                try:
                    check_path(path)  # names the bad key: "loss.structure.lamda_sep: unknown key ..."
                except ConfigError as err:
                    raise ValueError(f"{where}: {err}") from None
        d, st = self.data, self.loss.structure
        if d.view_pair == "text_text" and not d.pair_locale:
            raise ValueError("data.view_pair=text_text needs data.pair_locale (the locale of the second title)")
        if d.view_pair != "image_text" and st.in_modal_active():
            raise ValueError(f"loss.structure regularizers need data.view_pair=image_text, got {d.view_pair}")
        image_cfg_size = self.model.image.hf_config.get("image_size")
        if image_cfg_size is not None and image_cfg_size != self.data.image_size:
            raise ValueError(
                f"model.image.hf_config.image_size={image_cfg_size} differs from data.image_size={self.data.image_size}"
            )
        if d.features.train or d.features.val:
            m = self.model
            if not (m.image.fully_locked and m.text.fully_locked):
                raise ValueError("data.features (cached tower features) needs model.image.locked and model.text.locked "
                                 "with unlocked_layers 0: a tower that trains cannot be cached")
            if m.kind != "two_tower" or d.view_pair != "image_text":
                raise ValueError("data.features: cached features train a two_tower model on the image_text pair")
            if st.in_modal_active() or st.lambda_sep > 0 or st.lambda_br > 0 or st.lambda_gc > 0:
                raise ValueError("data.features: the structure regularizers need augmented views, which cached "
                                 "features do not have (set loss.structure weights to 0 and in_modal to auto or "
                                 "false)")
        # deep feature separation needs the specific heads: resolve model.specific_heads=None from it
        self.model._sep_active = self.loss.structure.lambda_sep > 0
        if self.loss.structure.lambda_sep > 0 and self.model.specific_heads is False:
            raise ValueError("loss.structure.lambda_sep > 0 needs model.specific_heads (set it to true or null)")
        return self


def check_path(path: str) -> None:
    """Raise ConfigError naming `path` if it does not address a field of the tree."""
    model: Any = GammarayConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            # dict-valued fields (hf_config) accept any sub-key
            if model is dict or getattr(model, "__origin__", None) is dict:
                return
            raise ConfigError(f"{path}: '{'.'.join(parts[:i])}' is a value, it has no key '{part}'")
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            where = ".".join(parts[:i]) or "<root>"
            msg = f"{path}: unknown key '{part}' in {where}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            raise ConfigError(msg)
        ann = fields[part].annotation
        model = section_type(ann)


def section_type(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    origin = getattr(ann, "__origin__", None)
    if origin is dict or ann is dict:
        return dict
    return None
