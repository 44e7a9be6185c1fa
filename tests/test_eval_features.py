"""Cached tower features on the real stack: `gammaray embed --features` (Ray Data, S3) writes what the
towers compute, `gammaray pretrain` trains heads on them (resumable, state loaded as data only), the
exported model evaluated live by `gammaray eval` agrees with the heads' own evaluation, and Ray Tune
runs heads trials."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from pipelines import storage
from tests.conftest import tiny_overrides

LOCKED = {"model.image.locked": True, "model.text.locked": True}


@pytest.fixture(scope="module")
def stores(ray_local, s3, small_catalogue):
    from workers.evaluation.embed import EmbedOptions, embed_catalogue

    cfg = apply_overrides(GammarayConfig(), {**tiny_overrides(small_catalogue, s3.url("runs"), "features"), **LOCKED})
    out = {}
    for split in ("train", "val"):
        uri = s3.url("features", split)
        res = embed_catalogue(None, small_catalogue[split], uri, EmbedOptions(progress=False, batch_size=32),
                              features=True, config=cfg)
        out[split] = uri
        out[f"{split}_result"] = res
    out["cfg"] = cfg
    return out


@pytest.mark.eval
@pytest.mark.timeout(600)
def test_embed_features_writes_the_towers_pooled_outputs(stores, small_catalogue):
    from pipelines.prepare import load_manifest
    from workers.evaluation.export import open_checkpoint
    from workers.evaluation.features import load_feature_store
    from workers.models.registry import load_model

    res = stores["train_result"]
    assert res.records_written == 384 and res.records_quarantined == 0
    assert res.columns == ["product_id", "sample_index", "image_features", "text_features"]
    fs = load_feature_store(stores["train"])
    assert len(fs) == 384 and np.all(np.diff(fs.sample_index) > 0)
    assert fs.widths == (32, 32)
    manifest = load_manifest(small_catalogue["train"])
    assert set(fs.prompts) == set(manifest["categories"]) and all(c in fs.prompts for c in fs.category)
    # the store is also a checkpoint: its towers give exactly the stored features
    ckpt = open_checkpoint(stores["train"])
    model = load_model(ckpt.model_dir).eval()
    from workers.evaluation.evaluate import embed_split

    cfg = apply_overrides(ckpt.cfg, {"data.val": small_catalogue["train"]})

    class Features(torch.nn.Module):  # embed_split runs `engine(batch)`: give it the pooled features
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, batch):
            from gammaray.schema import BatchKeys as K

            return {"image": self.m.image_features(batch[K.PIXELS])[0],
                    "text": self.m.text_features(batch[K.INPUT_IDS], batch[K.ATTENTION_MASK])[0]}

    live = embed_split(Features(model).eval(), cfg, ckpt.store, small_catalogue["train"], torch.device("cpu"), None)
    order = np.argsort(live["sample_index"])
    np.testing.assert_allclose(live["image"][order], fs.image, rtol=0, atol=1e-5)
    np.testing.assert_allclose(live["text"][order], fs.text, rtol=0, atol=1e-5)
    # a rerun is a no-op; the store refuses to be mixed with head embeddings
    from workers.evaluation.embed import EmbedOptions, embed_catalogue

    again = embed_catalogue(None, small_catalogue["train"], stores["train"], EmbedOptions(progress=False),
                            features=True, config=stores["cfg"])
    assert again.shards_embedded == 0 and again.records_written == 384
    with pytest.raises(ValueError, match="kind"):
        embed_catalogue(stores["train"], small_catalogue["train"], stores["train"], EmbedOptions(progress=False))


@pytest.mark.eval
@pytest.mark.timeout(600)
def test_pretrain_on_cached_features_resumes_exports_and_evaluates_like_the_live_model(stores, s3, small_catalogue):
    from workers.evaluation.evaluate import evaluate_checkpoint
    from workers.training.heads import STATE_FILE
    from workers.training.trainer import pretrain

    over = {**tiny_overrides(small_catalogue, s3.url("runs"), "heads-e2e"), **LOCKED,
            "data.features.train": stores["train"], "data.features.val": stores["val"], "train.epochs": 2,
            "data.batch_size": 32, "loss.gamma.track_age": True}
    cfg = apply_overrides(GammarayConfig(), over)
    first = pretrain(cfg, progress=False)
    assert first.metrics["steps"] == 2 * 12 and first.metrics["samples_seen_total"] == 2 * 384
    assert first.metrics["resumed_from_epoch"] == 0
    # the same run with more epochs resumes from its state after epoch 2
    more = pretrain(apply_overrides(cfg, {"train.epochs": 3}), progress=False)
    assert more.metrics["resumed_from_epoch"] == 2 and more.metrics["steps"] == 3 * 12
    for key in ("val_r_at_1", "val_zero_shot_acc", "gamma/log_memory_over_exact_mean"):
        assert key in more.metrics, key
    # ages are diagnostics, not checkpointed: known in the uninterrupted run (one epoch = 12 steps ago)
    assert 1 <= first.metrics["gamma/memory_age_mean"] <= 2 * 12
    assert more.metrics["gamma/memory_first_visit_fraction"] == 1.0
    # the export is a checkpoint: evaluated live (towers on the catalogue), the same R@1 and zero-shot
    live = evaluate_checkpoint(more.checkpoint_uri, small_catalogue["val"], device="cpu")["metrics"]
    assert live["r_at_1_i2t"] == pytest.approx(more.metrics["val_r_at_1_i2t"], abs=1.5 / 96)
    assert live["r_at_1_t2i"] == pytest.approx(more.metrics["val_r_at_1_t2i"], abs=1.5 / 96)
    assert live["zero_shot_acc"] == pytest.approx(more.metrics["val_zero_shot_acc"], abs=1.5 / 96)
    lines = storage.read_bytes(storage.join(more.run_dir, "metrics.jsonl")).decode().splitlines()
    assert len(lines) == 3
    # the saved state is data: a pickle that would run code is refused, naming the file
    marker = os.path.join(os.environ.get("TMPDIR", "/tmp"), "gammaray-pickle-ran")

    class Payload:
        def __reduce__(self):
            return (open, (marker, "w"))

    buf = io.BytesIO()
    torch.save({"model": Payload()}, buf)
    state_uri = storage.join(more.run_dir, "heads", STATE_FILE)
    storage.write_bytes(state_uri, buf.getvalue())
    with pytest.raises(ValueError, match=STATE_FILE):
        pretrain(apply_overrides(cfg, {"train.epochs": 4}), progress=False)
    assert not os.path.exists(marker)


@pytest.mark.tune
@pytest.mark.timeout(600)
def test_tune_runs_heads_trials_on_cached_features(stores, s3, small_catalogue, tmp_path):
    from tuning.search import run_tune

    over = {**tiny_overrides(small_catalogue, s3.url("runs"), "heads-tune"), **LOCKED,
            "data.features.train": stores["train"], "data.features.val": stores["val"], "train.epochs": 2,
            "tune.samples": 3, "tune.trial_cpus": 1, "tune.scheduler": "fifo", "loss.kind": "infonce",
            "tune.space": {"train.optim.lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-2},
                           "model.temperature": {"kind": "loguniform", "low": 0.02, "high": 0.2}},
            "tune.points_to_evaluate": [{}]}
    out = run_tune(apply_overrides(GammarayConfig(), over), progress=False, out_dir=str(tmp_path), log=lambda s: None)
    assert len(out.rows) == 3 and all(r.status == "completed" for r in out.rows)
    assert all(r.steps == 2 * 24 for r in out.rows)          # 384 records / batch 16 x 2 epochs
    assert out.plan.cpus_held_per_trial == 1
    base = [r for r in out.rows if r.values["train.optim.lr"] == pytest.approx(5e-4)]
    assert base, "the base config ran first (points_to_evaluate)"
    assert out.best_config is not None and out.best_config.data.features.train == stores["train"]
