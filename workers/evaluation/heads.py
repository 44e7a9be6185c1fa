"""Heads on cached tower features, evaluated: held-out retrieval both ways and zero-shot category
accuracy from a feature store's vectors (`gammaray embed --features`), in one process. The heads are
trained by workers/training/heads.py (the locked-towers regime); this module only reads them.
"""

from __future__ import annotations

import numpy as np
import torch

from gammaray.schema import BatchKeys as K
from workers.evaluation.features import FeatureSet
from workers.evaluation.metrics import recall_at_k, retrieval_ranks, zero_shot_accuracy
from workers.models.two_tower import TwoTowerModel


def feature_tensors(fs: FeatureSet, device: torch.device) -> dict[str, torch.Tensor]:
    return {K.IMAGE_FEATURES: torch.from_numpy(fs.image).to(device),
            K.TEXT_FEATURES: torch.from_numpy(fs.text).to(device),
            K.SAMPLE_INDEX: torch.from_numpy(fs.sample_index).to(device)}


@torch.no_grad()
def embed_features(model: TwoTowerModel, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    out = model({K.IMAGE_FEATURES: data[K.IMAGE_FEATURES], K.TEXT_FEATURES: data[K.TEXT_FEATURES]})
    model.train(was)
    return out["image"].float(), out["text"].float()


@torch.no_grad()
def evaluate_heads(model: TwoTowerModel, fs: FeatureSet, device: torch.device | str = "cpu",
                   data: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Held-out retrieval both ways (`r_at_k` = the mean of the two directions, ties count against)
    and zero-shot category accuracy against the store's prompt features."""
    data = data if data is not None else feature_tensors(fs, torch.device(device))
    image, text = embed_features(model, data)
    out: dict[str, float] = {}
    i2t, t2i = recall_at_k(retrieval_ranks(image, text)), recall_at_k(retrieval_ranks(text, image))
    for k in (1, 5, 10):
        out[f"r_at_{k}_i2t"], out[f"r_at_{k}_t2i"] = i2t[k], t2i[k]
        out[f"r_at_{k}"] = 0.5 * (i2t[k] + t2i[k])
    classes = sorted({c for c in fs.category if c is not None and c in fs.prompts})
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index.get(c, -1) if c is not None else -1 for c in fs.category])
        keep = torch.from_numpy(labels >= 0)
        prompts = torch.from_numpy(np.stack([fs.prompts[c] for c in classes])).to(image.device)
        class_text = model({K.TEXT_FEATURES: prompts})["text"].float()
        out["zero_shot_acc"] = zero_shot_accuracy(image[keep.to(image.device)], class_text,
                                                  torch.from_numpy(labels[labels >= 0]).to(image.device))
        out["zero_shot_chance"] = 1.0 / len(classes)
    out["records"] = float(len(fs))
    return out
