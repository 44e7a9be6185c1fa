"""`gammaray index` and `gammaray search` (real FAISS, real Ray, real SeaweedFS): the documented
index rule, IVF-PQ built in parallel Ray tasks agreeing with exact search, the stored index round
trip, queries embedded with the training preprocessing finding their own record, and an index
refusing a query model it was not built with."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.eval_support import make_checkpoint, read_catalogue

pytestmark = pytest.mark.eval


def write_synthetic_embeddings(out: str, n: int, d: int, shards: int, seed: int = 0) -> np.ndarray:
    """An embedded catalogue in gammaray embed's layout, vectors from a mixture of 64 clusters
    (embeddings are clustered; uniform noise has no neighbours worth finding)."""
    from pipelines import storage
    from workers.evaluation.embed import output_schema

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d))
    x = (centres[rng.integers(64, size=n)] + 0.35 * rng.normal(size=(n, d))).astype(np.float32)
    meta = {"format": 1, "kind": "embeddings", "checkpoint": "synthetic", "model_fingerprint": "f" * 16,
            "data": "synthetic", "columns": ["image_embedding", "text_embedding"], "dims": {"image": d, "text": d}}
    storage.write_json(storage.join(out, "_embed.json"), meta)
    schema = output_schema(["image", "text"], {"image": d, "text": d}, meta)
    for s, rows in enumerate(np.array_split(np.arange(n), shards)):
        flat = pa.array(x[rows].reshape(-1))
        t = pa.Table.from_pydict({"product_id": [f"p{i}" for i in rows], "sample_index": rows.astype(np.int64),
                                  "image_embedding": pa.FixedSizeListArray.from_arrays(flat, d),
                                  "text_embedding": pa.FixedSizeListArray.from_arrays(flat, d)}, schema=schema)
        buf = io.BytesIO()
        pq.write_table(t, buf)
        storage.write_bytes(storage.join(out, "embeddings", f"part-{s:05d}.parquet"), buf.getvalue())
    return x


def test_index_rule():
    from workers.evaluation.index import plan_index

    assert plan_index(50_000, 64).kind == "flat"
    big = plan_index(100_000, 256)
    assert (big.kind, big.nlist, big.m, big.nbits, big.nprobe, big.refine) == ("ivfpq", 512, 64, 8, 16, 4)
    huge = plan_index(1_000_000, 64)
    assert (huge.nlist, huge.m, huge.train_size, huge.nprobe) == (2048, 16, 81_920, 64)
    assert plan_index(60_000, 30).m == 15  # d/4 does not divide 30: d/2 sub-quantizers
    assert plan_index(4_000, 32, flat_max=1_000).nbits == 4  # too few vectors to train 256 code words


@pytest.mark.timeout(300)
def test_ivfpq_parallel_agrees_with_exact_and_round_trips(ray_local, tmp_path):
    from workers.evaluation.index import OpenIndex, build_index, plan_index

    n, d = 4_000, 32
    x = write_synthetic_embeddings(str(tmp_path / "emb"), n, d, shards=4)
    exact = build_index(str(tmp_path / "emb"), str(tmp_path / "exact"), with_titles=False)
    assert exact.kind == "flat" and exact.count == n and not exact.parallel
    plan = plan_index(n, d, flat_max=1_000)
    par = build_index(str(tmp_path / "emb"), str(tmp_path / "ann"), plan=plan, parallel=True, with_titles=False)
    seq = build_index(str(tmp_path / "emb"), str(tmp_path / "seq"), plan=plan, parallel=False, with_titles=False)
    assert (par.kind, par.parallel, par.shards) == ("ivfpq", True, 4) and not seq.parallel

    rng = np.random.default_rng(1)
    queries = x[rng.choice(n, 100, replace=False)] + 0.1 * rng.normal(size=(100, d)).astype(np.float32)
    flat, ann, ann_seq = (OpenIndex(str(tmp_path / p)) for p in ("exact", "ann", "seq"))
    truth = [[h.product_id for h in hits] for hits in flat.search(queries, 10)]
    got = [[h.product_id for h in hits] for hits in ann.search(queries, 10)]
    # the exact answer, computed here from the vectors themselves
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    assert truth == [[f"p{i}" for i in row] for row in np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :10]]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    assert recall >= 0.85, recall  # 4-bit codes (too few vectors for 8) and nprobe = 8 of 128 cells
    # shards added in Ray tasks and merged = added in one process
    assert got == [[h.product_id for h in hits] for hits in ann_seq.search(queries, 10)]
    # re-ranked scores are the exact cosines
    top = ann.search(queries[:1], 3)[0]
    for h in top:
        assert h.score == pytest.approx(float(qn[0] @ xn[int(h.product_id[1:])]), abs=1e-5)
    assert ann.meta["kind"] == "ivfpq" and ann.meta["plan"]["nlist"] == plan.nlist and ann.meta["count"] == n
    # a damaged index is named, not searched
    items = tmp_path / "ann" / "items.parquet"
    pq.write_table(pq.read_table(items).slice(0, 10), items)
    with pytest.raises(ValueError, match="index.faiss holds 4000 vectors, items.parquet 10"):
        OpenIndex(str(tmp_path / "ann"))


@pytest.mark.timeout(300)
def test_search_cli_finds_the_record_and_refuses_another_model(embedded_catalogue, small_catalogue, tmp_path, capsys):
    from gammaray.app.cli import main
    from pipelines import storage
    from pipelines.preprocess import record_text

    emb = embedded_catalogue["embeddings"]
    assert main(["index", "--embeddings", emb, "--field", "text"]) == 0
    assert main(["index", "--embeddings", emb]) == 0
    out = capsys.readouterr().out
    assert f"indexed {emb}/index-text" in out and "flat" in out
    assert storage.exists(f"{emb}/index-image/index.faiss") and storage.exists(f"{emb}/index-text/items.parquet")

    rows = read_catalogue(small_catalogue["val"])
    i = 7
    query = record_text(rows["title"][i], rows["description"][i], rows["category"][i])
    assert main(["search", "--index", f"{emb}/index-text", "--text", query, "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["hits"]) == 3 and res["column"] == "text_embedding"
    top = res["hits"][0]
    assert top["product_id"] == rows["product_id"][i] and top["title"] == rows["title"][i]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)  # the same text through the same preprocessing
    assert [h["rank"] for h in res["hits"]] == [1, 2, 3] and res["hits"][1]["score"] <= top["score"]

    image = tmp_path / "query.img"
    image.write_bytes(rows["image"][i])
    assert main(["search", "--index", f"{emb}/index-image", "--image", str(image), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["#", "product_id", "score", "title"]
    first = lines[1].split()
    assert first[:2] == ["1", rows["product_id"][i]] and float(first[2]) == pytest.approx(1.0, abs=1e-3)
    assert " ".join(first[3:]) == rows["title"][i] and len(lines) == 3

    other, _ = make_checkpoint(str(tmp_path), small_catalogue, seed=1, name="other")
    assert main(["search", "--index", f"{emb}/index-text", "--text", "red boots", "--checkpoint", other]) == 1
    err = capsys.readouterr().err
    assert "was built from embeddings of model" in err and "the query model" in err
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"not an image")
    assert main(["search", "--index", f"{emb}/index-image", "--image", str(bad)]) == 1
    assert "image_undecodable" in capsys.readouterr().err
