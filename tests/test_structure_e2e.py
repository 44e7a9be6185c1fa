"""Both model kinds train with every structure term in the demo pipeline: SeaweedFS S3, Ray Data,
Ray Train with 2 workers, DeepSpeed ZeRO-1 over gloo, checkpoints and held-out evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from pipelines import storage
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.structure

TERMS = ("contrastive_loss", "in_modal_loss", "sep_loss", "bridge_loss", "gc_loss")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind,loss", [("two_tower", {"loss.kind": "gamma"}),
                                       ("fusion", {"loss.kind": "infonce", "loss.gather_negatives": True})])
def test_model_kind_trains_with_all_regularizers_on_two_workers(ray_local, s3, small_catalogue, kind, loss):
    from workers.training.trainer import pretrain

    overrides = tiny_overrides(small_catalogue, s3.url("runs"), f"structure-{kind}")
    overrides.update({
        "model.kind": kind, **loss,
        "loss.structure.in_modal": True, "loss.structure.lambda_sep": 0.5, "loss.structure.lambda_br": 1.0,
        "loss.structure.lambda_gc": 0.5, "loss.structure.bridge_t_range": [0.1, 0.4],
        "train.max_steps": 6, "train.log_every": 3, "eval.max_records": 64,
    })
    cfg = apply_overrides(GammarayConfig(), overrides)
    res = pretrain(cfg, progress=False)
    m = res.metrics

    expected = TERMS + (("itm_loss",) if kind == "fusion" else ())
    for name in expected + ("structure/ortho", "structure/uniformity", "structure/bridge", "structure/gc_aug",
                            "val_r_at_1_i2t", "val_modality_gap"):
        assert name in m, name
        assert math.isfinite(m[name]), name
    assert m["loss"] == pytest.approx(sum(m[t] for t in expected), rel=1e-4, abs=1e-5)
    assert m["step"] == 6 and m["val_records"] == 64
    if kind == "fusion":
        assert 0.0 <= m["itm/accuracy"] <= 1.0

    # every report of the run carries the terms by name (the metrics stream that Ray Tune reads)
    lines = [json.loads(x) for x in storage.read_bytes(storage.join(res.run_dir, "metrics.jsonl")).decode().splitlines()]
    assert [ln["step"] for ln in lines if "sep_loss" in ln][:2] == [3, 6]

    # the exported model holds the specific heads beside the shared ones; momentum encoders stay out
    files = storage.list_files(res.checkpoint_uri)
    heads_file = next(f for f in files if f.endswith("model/heads.pt"))
    heads = torch.load(storage.buffer(storage.read_bytes(heads_file)), weights_only=False)
    assert {"image_proj.weight", "image_specific_proj.weight", "text_specific_proj.weight"} <= set(heads)
    assert not any(k.startswith("momentum.") for k in heads)
    if kind == "fusion":
        assert "itm_head.weight" in heads
