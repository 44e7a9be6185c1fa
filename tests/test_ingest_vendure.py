"""The importer example on real product photos: the Vendure sample catalogue, fetched with npm at run
time (cached outside the repository), prepared into the real S3 server and trained on."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from gammaray.config import GammarayConfig, apply_overrides
from pipelines import storage
from pipelines.prepare import PrepareOptions, prepare
from pipelines.tokenizer import build_for_catalogue
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ingest


@pytest.fixture(scope="module")
def vendure_package():
    from pipelines import vendure

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the Vendure example fetches @vendure/create with `npm pack` "
                    "(apt-get install npm to run it)")
    try:
        return vendure.fetch()
    except vendure.NpmUnavailable as err:
        pytest.skip(f"the Vendure example could not fetch @vendure/create: {err}")


def test_vendure_products_become_records(vendure_package):
    from pipelines import vendure

    products = vendure.read_products(vendure_package)
    assert len(products) == 54  # 88 CSV rows: the rest are variants, folded into their product
    cats = {p["category"].split(" > ")[0] for p in products}
    assert cats == {"Electronics", "Home & Garden", "Sports & Outdoor"}
    laptop = next(p for p in products if p["product_id"] == "vendure-laptop")
    assert laptop["attributes"]["brand"] == "Apple" and int(laptop["attributes"]["variants"]) > 1
    assert all(os.path.exists(os.path.join(vendure_package, "assets", p["image"])) for p in products)


@pytest.mark.timeout(600)
def test_vendure_catalogue_is_prepared_and_trained_on(ray_local, s3, vendure_package, tmp_path):
    import torch.distributed as dist

    from pipelines import vendure
    from workers.training.trainer import pretrain

    src = vendure.to_jsonl(vendure_package, str(tmp_path / "vendure.jsonl"))
    # images are referenced relative to the JSONL: copy them beside it (a user's folder layout)
    shutil.copytree(os.path.join(vendure_package, "assets", "images"), tmp_path / "images")
    base = s3.url("ingest", "vendure")
    res = prepare(src, f"{base}/catalog", PrepareOptions(progress=False, max_records_per_shard=32, row_group_size=16))
    assert (res.num_input, res.num_written, res.num_quarantined) == (54, 54, 0), res.summary()
    assert len(res.manifest["categories"]) == 6
    build_for_catalogue(f"{base}/catalog", f"{base}/tokenizer", res.manifest, vocab_size=400)

    cat = {"train": f"{base}/catalog", "val": f"{base}/catalog", "tokenizer": f"{base}/tokenizer"}
    cfg = apply_overrides(GammarayConfig(), {**tiny_overrides(cat, str(tmp_path / "runs"), "vendure"),
                                             "train.workers": 0, "data.batch_size": 16,
                                             "data.preprocess_concurrency": 1})
    try:
        pretrain(cfg, progress=False)  # in this process: one rank, no Ray Train start-up
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(tmp_path / "runs" / "vendure" / "local-checkpoint" / "rank-00000" / "train_state.json") as f:
        state = json.load(f)
    assert state["records_trained"] == 54  # every real product, one epoch, nothing quarantined
    assert state["last_val"]["records"] == 54
    assert 0.0 <= state["last_val"]["r_at_1_i2t"] <= 1.0 and "zero_shot_acc" in state["last_val"]
    assert storage.exists(storage.join(str(tmp_path / "runs" / "vendure"), "local-checkpoint", "model", "heads.pt"))
