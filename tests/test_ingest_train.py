"""Bad data through a real training run (SeaweedFS S3, Ray Data, Ray Train with 2 workers, DeepSpeed):
input records = records trained on + records quarantined, per-reason counts in the run's metrics,
the quarantine dataset in the run's storage, the abort threshold; the other view pairs train."""

from __future__ import annotations

import json
import tempfile

import pyarrow.parquet as pq
import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from gammaray.schema import BatchKeys as K, Reason
from pipelines import faults, storage
from pipelines.prepare import PrepareOptions, load_manifest, prepare
from pipelines.synthetic import write_raw_catalogue
from pipelines.tokenizer import build_for_catalogue
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ingest


@pytest.fixture(scope="module")
def bad_catalogue(s3):
    """96 input records: 90 good; at prepare, a missing image file, an empty title and a duplicate
    product_id are caught; a truncated JPEG, undecodable bytes and a decompression bomb pass (no
    image check) and are caught while streaming, as is a whole shard damaged after prepare."""
    base = s3.url("ingest", "train-bad")
    with tempfile.TemporaryDirectory() as raw:
        paths = write_raw_catalogue(raw, n_train=90, n_val=0, seed=8, bad_records=5, image_side=40)
        with open(f"{raw}/images/bomb.png", "wb") as f:
            f.write(faults.decompression_bomb())
        with open(paths["train"], "a") as f:
            f.write(json.dumps({"product_id": "BOMB", "title": "a huge poster", "image": "images/bomb.png"}) + "\n")
        res = prepare(paths["train"], f"{base}/catalog",
                      PrepareOptions(progress=False, check_images=False, max_records_per_shard=32, row_group_size=16))
    build_for_catalogue(f"{base}/catalog", f"{base}/tokenizer", res.manifest, vocab_size=300)
    storage.write_bytes(f"{base}/catalog/shards/part-00001.parquet", faults.garbage_parquet())
    return {"train": f"{base}/catalog", "val": None, "tokenizer": f"{base}/tokenizer", "input": res.num_input,
            "prepare": res}


@pytest.mark.timeout(600)
def test_training_run_accounts_for_every_input_record(ray_local, s3, bad_catalogue):
    from workers.training.trainer import pretrain

    prep = bad_catalogue["prepare"]
    assert prep.num_input == 96 and prep.num_written == 93
    assert prep.quarantine_by_reason == {Reason.IMAGE_NOT_FOUND: 1, Reason.EMPTY_TEXT: 1, Reason.DUPLICATE_ID: 1}
    cfg = apply_overrides(GammarayConfig(), {**tiny_overrides(bad_catalogue, s3.url("ingest", "runs"), "bad-data"),
                                             "data.batch_size": 8, "data.quarantine_max_fraction": 0.5,
                                             "data.preprocess_concurrency": 1})
    res = pretrain(cfg, progress=False)
    m = res.metrics
    stream_bad = {Reason.UNREADABLE_SHARD: 32, Reason.IMAGE_TRUNCATED: 1, Reason.IMAGE_UNDECODABLE: 1,
                  Reason.IMAGE_TOO_LARGE: 1}
    assert m["samples_seen_total"] == 93 - 35
    assert m["records_quarantined_stream"] == 35
    assert {k[len("quarantine_stream_"):]: v for k, v in m.items() if k.startswith("quarantine_stream_")} == stream_bad
    assert m["records_quarantined_prepare"] == 3
    assert m[f"quarantine_prepare_{Reason.DUPLICATE_ID}"] == 1
    # nothing lost: every input record was trained on or quarantined, exactly once
    assert m["samples_seen_total"] + m["records_quarantined_stream"] + m["records_quarantined_prepare"] == 96

    # the quarantine dataset in the run's storage names each record, its shard and the reason
    files = storage.list_files(storage.join(res.run_dir, "quarantine"), suffix=".parquet")
    assert len(files) == 2  # one per rank
    rows = [r for f in files for r in pq.read_table(storage.buffer(storage.read_bytes(f))).to_pylist()]
    assert len({(r["source"], r["row"]) for r in rows}) == 35
    assert {r["product_id"] for r in rows if r["reason"] == Reason.IMAGE_TOO_LARGE} == {"BOMB"}
    assert all(r["source"].startswith(bad_catalogue["train"]) for r in rows)
    # per-reason counts were also in the periodic metrics, summed over workers
    lines = [json.loads(x) for x in storage.read_bytes(storage.join(res.run_dir, "metrics.jsonl")).decode().splitlines()]
    assert lines[-1][f"quarantined_{Reason.UNREADABLE_SHARD}"] == 32


def test_runs_abort_above_the_bad_fraction_with_a_clear_message(s3, bad_catalogue):
    from workers.training.quarantine import DataQualityError, check_quality
    from workers.training.state import TrainState
    from pipelines.storage import Store
    from workers.training.trainer import preflight

    over = {**tiny_overrides(bad_catalogue, s3.url("ingest", "runs"), "abort"), "data.quarantine_max_fraction": 0.02}
    with pytest.raises(DataQualityError, match=r"prepare quarantined 3 of 96 records \(3.1%\).*duplicate_product_id"):
        preflight(apply_overrides(GammarayConfig(), over), Store.of())
    preflight(apply_overrides(GammarayConfig(), {**over, "data.quarantine_max_fraction": 0.05}), Store.of())  # 3.1% < 5%

    cfg = apply_overrides(GammarayConfig(), {**over, "data.quarantine_max_fraction": 0.1})
    state = TrainState(records_trained=89)
    state.quarantine = [{"reason": Reason.IMAGE_TRUNCATED, "source": "s", "row": i} for i in range(10)]
    check_quality(state, cfg)  # 10 of 99 = 10.1% but fewer than 100 seen: too early to judge
    state.records_trained = 90
    check_quality(state, cfg)  # 10 of 100: at the threshold, not above it
    state.quarantine.append({"reason": Reason.IMAGE_TRUNCATED, "source": "s", "row": 10})
    with pytest.raises(DataQualityError, match=r"11 of 101 records \(10.9%\).*image_truncated"):
        check_quality(state, cfg)


@pytest.mark.parametrize("pair", ["text_text", "image_image"])
def test_other_view_pairs_feed_the_model_and_objective(s3, tmp_path, pair):
    """The pipeline's batch for each view pair goes through the two-tower model and the gamma
    objective with gradients reaching the tower that encodes the second view."""
    from pipelines.preprocess import PreprocessSpec, preprocess_batch
    from pipelines.stream import read_segment_rows, units_from_manifest
    from pipelines.tokenizer import load
    from workers.models.registry import build_model
    from workers.training.objective import Objective
    from workers.batches import to_torch

    base = s3.url("ingest", "pairs-train")
    if not storage.exists(f"{base}/catalog/manifest.json"):
        paths = write_raw_catalogue(str(tmp_path), n_train=24, n_val=0, seed=6, image_side=40, pair_views=True)
        res = prepare(paths["train"], f"{base}/catalog", PrepareOptions(progress=False))
        build_for_catalogue(f"{base}/catalog", f"{base}/tok", res.manifest, vocab_size=200)
    m = load_manifest(f"{base}/catalog")
    cfg = apply_overrides(GammarayConfig(), {**tiny_overrides({"train": f"{base}/catalog", "val": None,
                                                               "tokenizer": f"{base}/tok"}, "runs", "x"),
                                             "data.view_pair": pair, "data.pair_locale": "de_DE"})
    tok = load(f"{base}/tok", storage.S3Settings.from_config(None))
    spec = PreprocessSpec(image_size=64, max_image_pixels=10**7, max_text_tokens=16, max_text_chars=1000,
                          augment=cfg.data.augment, tokenizer_uri=f"{base}/tok", seed=0, epoch=0,
                          with_aug_views=False, train=True, view_pair=pair, pair_locale="de_DE")
    u = units_from_manifest(m)[0]
    t = read_segment_rows(f"{base}/catalog", u, 0, 0, u.num_rows, 0, 0, False, None, spec.columns)
    out = preprocess_batch({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}, spec, tok)
    assert set(out[K.REJECT]) == {""}
    batch = to_torch({k: v for k, v in out.items() if v.dtype != object}, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    emb = model(batch)
    side_a, side_b = {"text_text": ("text", "text_pair"), "image_image": ("image", "image_pair")}[pair]
    assert emb[side_a].shape == emb[side_b].shape == (u.num_rows, cfg.model.embed_dim)
    terms = Objective(cfg.loss, num_samples=m["next_sample_index"], view_pair=pair)(emb, batch)
    terms.total.backward()
    tower = model.text_tower if pair == "text_text" else model.image_tower
    assert torch.isfinite(terms.total) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    other = model.image_tower if pair == "text_text" else model.text_tower
    assert all(p.grad is None for p in other.parameters())  # the unused tower is untouched


def test_config_rejects_inconsistent_view_pairs():
    from gammaray.config import ConfigError

    with pytest.raises(ConfigError, match="pair_locale"):
        apply_overrides(GammarayConfig(), {"data.view_pair": "text_text"})
    with pytest.raises(ConfigError, match="structure regularizers need data.view_pair=image_text"):
        apply_overrides(GammarayConfig(), {"data.view_pair": "image_image", "loss.structure.lambda_br": 0.1})


def test_to_torch_copies_read_only_arrays_and_shares_writable_ones():
    """Arrow hands out read-only buffers: those become tensors of their own (no 'not writable'
    warning, no in-place write into Arrow's memory); writable arrays stay zero-copy."""
    import warnings

    import numpy as np
    import pyarrow as pa

    from workers.batches import to_torch

    ro = pa.array(np.arange(6, dtype=np.int64)).to_numpy(zero_copy_only=True)
    assert not ro.flags.writeable
    rw = np.arange(6, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_torch({"ro": ro, "rw": rw}, torch.device("cpu"))
    out["ro"].add_(1)
    out["rw"].add_(1)
    assert ro.tolist() == list(range(6)) and out["ro"].tolist() == list(range(1, 7))
    assert rw.tolist() == list(range(1, 7))  # shared
