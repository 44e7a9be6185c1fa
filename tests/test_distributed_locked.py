"""Locked towers under Ray Train + DeepSpeed (2 workers, ZeRO-1): the frozen weights and BatchNorm
statistics come out bit for bit as they went in, the unlocked blocks train, and the optimizer state
(the portable copy) holds moments of the trainable parameters only."""

from __future__ import annotations

import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from pipelines import storage
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed


@pytest.mark.timeout(600)
def test_locked_towers_stay_bit_for_bit_under_deepspeed(ray_local, s3, small_catalogue, tmp_path):
    from pipelines.tokenizer import load as load_tokenizer
    from workers.evaluation.export import open_checkpoint
    from workers.models.registry import build_model, load_model
    from workers.training.trainer import pretrain

    over = tiny_overrides(small_catalogue, s3.url("runs"), "locked")
    over.update({"model.image.hf_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                                           "depths": [1, 1], "layer_type": "basic"},
                 "model.text.hf_config": {**over["model.text.hf_config"], "num_hidden_layers": 2},
                 "model.image.locked": True, "model.text.locked": True, "model.text.unlocked_layers": 1,
                 "train.checkpoint_every": 5})
    cfg = apply_overrides(GammarayConfig(), over)
    res = pretrain(cfg, progress=False)
    assert res.metrics["samples_seen_total"] == 384

    # the initial model, as the loop built it (same seed, same vocabulary)
    tok = load_tokenizer(small_catalogue["tokenizer"])
    torch.manual_seed(cfg.run.seed)
    before = build_model(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id).state_dict()
    after = load_model(open_checkpoint(res.checkpoint_uri, local_dir=str(tmp_path / "m")).model_dir).state_dict()
    image = [k for k in before if k.startswith("image_tower.")]
    assert any("running_mean" in k for k in image)              # BatchNorm statistics are among them
    for k in image:
        assert torch.equal(before[k], after[k]), k
    frozen_text = [k for k in before if k.startswith(("text_tower.embeddings.", "text_tower.encoder.layer.0."))]
    for k in frozen_text:
        assert torch.equal(before[k], after[k]), k
    # (the pooler is trainable too, but mean pooling never uses it: no gradient reaches it)
    trained = [k for k in before if k.startswith(("text_tower.encoder.layer.1.", "image_proj"))
               and k.endswith("weight")]
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)

    # the portable optimizer state: Adam moments for trainable parameters only
    files = storage.list_files(res.checkpoint_uri)
    portable = next(f for f in files if f.endswith("portable.pt"))
    state = torch.load(storage.buffer(storage.read_bytes(portable)), map_location="cpu", weights_only=True)
    moments = set(state["exp_avg"])
    assert not any(k.startswith("image_tower.") for k in moments)
    assert not any(k.startswith(("text_tower.embeddings.", "text_tower.encoder.layer.0.")) for k in moments)
    assert any(k.startswith("text_tower.encoder.layer.1.") for k in moments)
    assert {"image_proj.weight", "text_proj.weight", "log_logit_scale"} <= moments
