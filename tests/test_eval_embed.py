"""`gammaray embed` over a catalogue in S3 whose bad images slip past `prepare` (check_images off):
Ray Data read/decode tasks + an actor pool, one output row per good product_id, the rest quarantined
with a reason, embeddings equal to the record-by-record computation, resumable by shard."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.eval_support import direct_embeddings, make_checkpoint, read_catalogue

pytestmark = pytest.mark.eval


@pytest.fixture(scope="module")
def leaky_catalogue(s3, small_catalogue):
    """42 records in 3 shards: 40 good + a truncated JPEG + garbage bytes that prepare did not decode;
    3 more raw records (missing file, empty title, duplicate id) quarantined by prepare."""
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.synthetic import write_raw_catalogue

    with tempfile.TemporaryDirectory() as raw:
        paths = write_raw_catalogue(raw, n_train=40, n_val=1, seed=9, bad_records=5, image_side=64)
        res = prepare(paths["train"], s3.url("leaky", "cat"),
                      PrepareOptions(progress=False, check_images=False, max_records_per_shard=16, row_group_size=8))
    return {"uri": s3.url("leaky", "cat"), "prepared": res, "raw_records": 45}


@pytest.mark.timeout(400)
def test_embed_rows_quarantine_equality_and_resume(ray_local, s3, small_catalogue, leaky_catalogue, tmp_path):
    from pipelines import storage
    from workers.evaluation.embed import EmbedOptions, embed_catalogue
    from workers.models.registry import load_model

    prep = leaky_catalogue["prepared"]
    assert prep.num_input == 45 and prep.num_quarantined == 3 and prep.num_written == 42
    ckpt_local, cfg = make_checkpoint(str(tmp_path), small_catalogue)
    ckpt = s3.url("embed-test", "ckpt")
    storage.upload_dir(ckpt_local, ckpt)  # the actors load the model from S3
    out = s3.url("embed-test", "out")
    opts = EmbedOptions(batch_size=16, actors=1, cpus_per_actor=0.5, progress=False)

    res = embed_catalogue(ckpt, leaky_catalogue["uri"], out, opts)
    assert res.records_in == 42 and res.shards_total == 3 and res.shards_embedded == 3
    # input minus quarantined (3 by prepare, 2 while decoding) = 40 rows
    assert res.records_written == leaky_catalogue["raw_records"] - prep.num_quarantined - res.records_quarantined == 40
    assert res.records_quarantined == 2 and res.records_per_s > 0

    files = storage.list_files(storage.join(out, "embeddings"), ".parquet")
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = _read_all(files)
    ids = table["product_id"]
    assert len(ids) == 40 and len(set(ids)) == 40
    q = _read_all(storage.list_files(storage.join(out, "quarantine"), ".parquet"))
    assert sorted(q["reason"]) == ["image_truncated", "image_undecodable"]
    assert set(q["stage"]) == {"embed"}
    rows = read_catalogue(leaky_catalogue["uri"])
    assert set(ids) == set(rows["product_id"]) - set(q["product_id"])
    schema = pq.read_schema(storage.resolve(files[0])[1], filesystem=storage.resolve(files[0])[0])
    assert schema.names == ["product_id", "sample_index", "image_embedding", "text_embedding"]
    meta = json.loads(schema.metadata[b"gammaray.embed"])
    assert meta["dims"] == {"image": 32, "text": 32}

    # the embeddings are the model's, row by row
    model = load_model(f"{ckpt_local}/model").eval()
    ref = direct_embeddings(model, cfg, rows)
    assert ref["product_id"].tolist() == ids
    assert np.abs(np.stack(table["image_embedding"]) - ref["image"]).max() < 1e-5
    assert np.abs(np.stack(table["text_embedding"]) - ref["text"]).max() < 1e-5

    # resumable by shard: only the missing shard is embedded again, with the same result
    storage.resolve(files[1])[0].delete_file(storage.resolve(files[1])[1])
    again = embed_catalogue(ckpt, leaky_catalogue["uri"], out, opts)
    assert (again.shards_embedded, again.shards_skipped) == (1, 2)
    assert again.records_embedded_now == 16 and again.records_written == 40
    redone = _read_all(files)
    assert redone["product_id"] == ids and redone["sample_index"] == table["sample_index"]
    for col in ("image_embedding", "text_embedding"):  # other batch boundaries: float rounding only
        assert np.abs(np.stack(redone[col]) - np.stack(table[col])).max() < 1e-5

    # an output folder belongs to one model: another checkpoint is refused before any work
    other, _ = make_checkpoint(str(tmp_path), small_catalogue, seed=1, name="other")
    with pytest.raises(ValueError, match="model_fingerprint"):
        embed_catalogue(other, leaky_catalogue["uri"], out, opts)


def _read_all(files: list[str]) -> dict[str, list]:
    import pyarrow as pa

    from pipelines import storage

    t = pa.concat_tables([pq.read_table(storage.resolve(f)[1], filesystem=storage.resolve(f)[0]) for f in files])
    return {c: t.column(c).to_pylist() for c in t.column_names}


def test_embed_work_list_is_the_pending_shards_row_groups():
    """The work list (issue 22: it was quadratic) is every row group of the shards without an output,
    in catalogue order, each carrying its unit; built from vectors, one pass over the units."""
    from hypothesis import given, settings, strategies as st

    from pipelines.plan import UnitTable
    from workers.evaluation.embed import shard_name, work_list

    @given(st.lists(st.lists(st.integers(1, 9), max_size=4), max_size=12), st.data())
    @settings(max_examples=100, deadline=None)
    def check(groups, data):
        paths = [f"shards/part-{i:05d}.parquet" for i in range(len(groups))]
        units = UnitTable.from_row_groups(paths, groups)
        done = {shard_name(p) for p in paths if data.draw(st.booleans())}
        got = work_list(units, done)
        want = [(u, i) for u in range(len(units)) for i, p in enumerate(paths)
                if units[u].shard == p and shard_name(p) not in done]
        assert list(zip(got["unit"].tolist(), got["shard"].tolist())) == want
        assert [units[u].num_rows for u in got["unit"].tolist()] == got["num_rows"].tolist()
        assert [units[u].first_row for u in got["unit"].tolist()] == got["first_row"].tolist()

    check()
