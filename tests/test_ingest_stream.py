"""The training stream against the real S3 server and a real Ray instance: bad records and damaged
shards are quarantined in place (the data position stays exact, nothing is lost), the next epoch's
pipeline starts early, the view pairs, older shard versions, retries on transient network errors."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import struct
import tempfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gammaray.config import AugmentConfig
from gammaray.schema import RECORD_SCHEMA, BatchKeys as K, Reason
from pipelines import faults, storage, stream
from pipelines.prepare import PrepareOptions, load_manifest, prepare
from pipelines.preprocess import PreprocessSpec, normalise, preprocess_batch
from pipelines.stream import (StreamSpec, advance, epoch_plan, iterate, read_segment_rows,
                              units_from_manifest)
from pipelines.synthetic import write_raw_catalogue
from pipelines.tokenizer import build_for_catalogue, load as load_tokenizer

pytestmark = pytest.mark.ingest


def _spec(cat: str, manifest: dict, tok: str, epoch: int = 0, **pp) -> StreamSpec:
    units = units_from_manifest(manifest)
    p = PreprocessSpec(image_size=32, max_image_pixels=4_000_000, max_text_tokens=16, max_text_chars=2000,
                       augment=AugmentConfig(), tokenizer_uri=tok, seed=1, epoch=epoch, with_aug_views=False,
                       train=True, **pp)
    return StreamSpec(catalogue_uri=cat, units=tuple(units), preprocess=p, settings=storage.S3Settings.from_config(None),
                      shuffle=True, batch_size=8, preprocess_num_cpus=1.0, prefetch_batches=2)


@pytest.fixture(scope="module")
def damaged_catalogue(s3):
    """60 good records, 3 images that only a decode can judge (prepared without the image check),
    then one whole shard (24 records) overwritten with garbage in S3 after prepare."""
    base = s3.url("ingest", "stream")
    with tempfile.TemporaryDirectory() as raw:
        paths = write_raw_catalogue(raw, n_train=60, n_val=0, seed=21, image_side=40)
        with open(paths["train"], "a") as f:
            for name, data in (("garbage", faults.undecodable_bytes()), ("truncated", faults.truncated_jpeg()),
                               ("bomb", faults.decompression_bomb())):
                with open(f"{raw}/images/{name}.jpg", "wb") as img:
                    img.write(data)
                f.write(json.dumps({"product_id": f"S-{name}", "title": f"a {name} thing",
                                    "image": f"images/{name}.jpg"}) + "\n")
        res = prepare(paths["train"], f"{base}/catalog", PrepareOptions(progress=False, check_images=False,
                                                                         max_records_per_shard=24, row_group_size=8))
    assert res.num_written == 63 and res.num_quarantined == 0
    build_for_catalogue(f"{base}/catalog", f"{base}/tokenizer", res.manifest, vocab_size=300)
    storage.write_bytes(f"{base}/catalog/shards/part-00001.parquet", faults.garbage_parquet(4096))
    return {"cat": f"{base}/catalog", "tok": f"{base}/tokenizer", "manifest": load_manifest(f"{base}/catalog")}


def _drain(spec, part, start=0, then=None):
    good, rejects, consumed = [], [], start
    for sb in iterate(spec, part, start, then=then):
        assert sb.size <= spec.batch_size
        if sb.size:
            good.extend(sb.arrays[K.SAMPLE_INDEX].tolist())
            assert sb.arrays[K.PIXELS].shape[1:] == (3, 32, 32)
        rejects.extend(sb.rejected)
        assert sb.consumed > consumed or not sb.size
        consumed = sb.consumed
    return good, rejects, consumed


@pytest.mark.timeout(300)
def test_stream_quarantines_in_place_and_loses_nothing(ray_local, damaged_catalogue, monkeypatch):
    cat, m = damaged_catalogue["cat"], damaged_catalogue["manifest"]
    spec = _spec(cat, m, damaged_catalogue["tok"])
    parts = epoch_plan(list(spec.units), 0, seed=1, world_size=2, shuffle=True)
    good, rejects = [], []
    for part in parts:
        g, r, consumed = _drain(spec, part)
        assert consumed == sum(s.size for s in part)  # the position counts bad records too
        good += g
        rejects += r
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    assert by_reason == {Reason.UNREADABLE_SHARD: 24, Reason.IMAGE_UNDECODABLE: 1, Reason.IMAGE_TRUNCATED: 1,
                         Reason.IMAGE_TOO_LARGE: 1}
    assert len(good) + len(rejects) == m["num_records"] == 63
    assert len(set(good)) == len(good) == 36
    damaged = [r for r in rejects if r["reason"] == Reason.UNREADABLE_SHARD]
    assert {r["source"] for r in damaged} == {f"{cat}/shards/part-00001.parquet"}
    assert sorted(r["row"] for r in damaged) == list(range(24))
    named = {r["product_id"]: r["reason"] for r in rejects if r["product_id"]}
    assert named == {"S-garbage": Reason.IMAGE_UNDECODABLE, "S-truncated": Reason.IMAGE_TRUNCATED,
                     "S-bomb": Reason.IMAGE_TOO_LARGE}

    # resuming mid-part skips exactly the consumed records, bad ones included
    part = parts[0]
    first_good, first_rejects, _ = _drain(spec, part)
    g, r, consumed = _drain(spec, advance(part, 13), start=13)
    assert consumed == sum(s.size for s in part)
    assert len(g) + len(r) == sum(s.size for s in part) - 13
    assert set(g) <= set(first_good)

    # a part cut into windows of one read task (one pipeline each, started one after the other: how
    # a long part keeps its sources bounded) yields the same records in the same order
    import pipelines.stream as stream

    monkeypatch.setattr(stream, "WINDOW_TASKS", 1)
    assert len(stream.windows(spec, part)) == len(part) > 1
    good_w, rejects_w, _ = _drain(spec, part)
    assert good_w == first_good
    assert [(r["product_id"], r["row"], r["reason"]) for r in rejects_w] == [
        (r["product_id"], r["row"], r["reason"]) for r in first_rejects]


@pytest.mark.timeout(300)
def test_next_epoch_pipeline_starts_early_and_yields_the_same_records(ray_local, small_catalogue):
    m = load_manifest(small_catalogue["train"])
    spec0 = _spec(small_catalogue["train"], m, small_catalogue["tokenizer"], epoch=0)
    spec1 = _spec(small_catalogue["train"], m, small_catalogue["tokenizer"], epoch=1)
    units = list(spec0.units)
    part0 = epoch_plan(units, 0, 1, 2, True)[0][:3]
    part1 = epoch_plan(units, 1, 1, 2, True)[0][:3]
    cold, _, _ = _drain(spec1, part1)
    g0, _, _ = _drain(spec0, part0, then=(spec1, part1))
    assert len(stream._warm.pumps) == 1 and stream._warm.pumps[0].spec == spec1  # started while epoch 0 was draining
    pump = stream._warm.pumps[0]
    warm, _, consumed = _drain(spec1, part1)
    assert not stream._warm.pumps and pump.produced_all.is_set()
    assert warm == cold and consumed == sum(s.size for s in part1)
    assert sorted(g0) != sorted(warm)
    # another pipeline in between (an evaluation pass) neither uses nor cancels the prefetched one
    stream.prefetch(spec1, part1)
    other, _, _ = _drain(spec0, part0)
    assert other == g0 and len(stream._warm.pumps) == 1
    stream.close_prefetched()
    assert not stream._warm.pumps
    # the training loop's stream hands the pixels over as uint8 (device_pixels): the same batches,
    # and the same floats once normalised (on the device, by workers/training/step.prepare_batch)
    host = list(iterate(spec0, part0))
    raw = list(iterate(dataclasses.replace(spec0, device_pixels=True), part0))
    assert [b.consumed for b in raw] == [b.consumed for b in host]
    for h, r in zip(host, raw):
        assert r.arrays[K.PIXELS].dtype == np.uint8 and r.arrays[K.PIXELS].shape[1:] == (32, 32, 3)
        assert np.array_equal(r.arrays[K.SAMPLE_INDEX], h.arrays[K.SAMPLE_INDEX])
        assert np.array_equal(normalise(r.arrays[K.PIXELS]), h.arrays[K.PIXELS])


def test_view_pairs_and_missing_views(s3, tmp_path):
    base = s3.url("ingest", "pairs")
    paths = write_raw_catalogue(str(tmp_path), n_train=10, n_val=0, seed=4, image_side=40, pair_views=True)
    with open(paths["train"], "a") as f:  # one record without a translation or a second photo
        f.write(json.dumps({"product_id": "LONE", "title": "lonely lamp", "image": "images/SYN-000000.jpg"}) + "\n")
    res = prepare(paths["train"], f"{base}/catalog", PrepareOptions(progress=False))
    assert res.num_written == 11 and res.manifest["locales"] == ["de_DE", "en_US"]
    build_for_catalogue(f"{base}/catalog", f"{base}/tok", res.manifest, vocab_size=200)
    units = units_from_manifest(res.manifest)
    tok = load_tokenizer(f"{base}/tok", storage.S3Settings.from_config(None))
    for pair, present, absent in (
        ("text_text", {K.INPUT_IDS, K.INPUT_IDS_PAIR, K.ATTENTION_MASK_PAIR}, {K.PIXELS, K.PIXELS_PAIR}),
        ("image_image", {K.PIXELS, K.PIXELS_PAIR}, {K.INPUT_IDS, K.INPUT_IDS_PAIR}),
        ("image_text", {K.PIXELS, K.INPUT_IDS}, {K.PIXELS_PAIR, K.INPUT_IDS_PAIR}),
    ):
        spec = _spec(f"{base}/catalog", res.manifest, f"{base}/tok", view_pair=pair, pair_locale="de_DE")
        t = read_segment_rows(spec.catalogue_uri, units[0], 0, 0, units[0].num_rows, 0, 1, False, spec.settings,
                              spec.preprocess.columns)
        out = preprocess_batch({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names},
                               spec.preprocess, tok)
        assert present <= out.keys() and not (absent & out.keys()), pair
        reasons = dict(zip(out[K.PRODUCT_ID], out[K.REJECT]))
        assert reasons.pop("LONE") == ("" if pair == "image_text" else Reason.MISSING_VIEW)
        assert set(reasons.values()) == {""}
        if pair == "text_text":
            i = list(out[K.PRODUCT_ID]).index("SYN-000000")
            text = tok.decode(out[K.INPUT_IDS_PAIR][i], skip_special_tokens=True)
            assert "aus" in text  # the German title, not the English one
        if pair == "image_image":  # the second photo is another render, not a copy of the first
            assert not np.allclose(out[K.PIXELS][0], out[K.PIXELS_PAIR][0])


def test_version_1_catalogues_stream_unchanged(s3):
    """A catalogue prepared before the schema gained `titles`/`extra_images` is still read."""
    base = s3.url("ingest", "v1")
    v1 = pa.schema([f for f in RECORD_SCHEMA if f.name not in ("titles", "extra_images")],
                   metadata={b"gammaray.schema_version": b"1"})
    rows = [{"product_id": f"V{i}", "sample_index": i, "title": f"old item {i}", "image": faults.good_jpeg(seed=i)}
            for i in range(6)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=v1), buf, row_group_size=3)
    storage.write_bytes(f"{base}/catalog/shards/part-00000.parquet", buf.getvalue())
    storage.write_json(f"{base}/catalog/manifest.json", {
        "schema_version": 1, "num_records": 6, "next_sample_index": 6, "sources": [], "categories": [],
        "shards": [{"path": "shards/part-00000.parquet", "num_rows": 6, "row_groups": [3, 3]}],
        "quarantine": {"count": 0, "by_reason": {}, "files": []}})
    m = load_manifest(f"{base}/catalog")
    units = units_from_manifest(m)
    assert [u.first_row for u in units] == [0, 3]
    t = read_segment_rows(f"{base}/catalog", units[1], 1, 0, 3, 0, 0, False, None,
                          ["product_id", "sample_index", "title", "image", "extra_images"])
    assert t.column("product_id").to_pylist() == ["V3", "V4", "V5"] and t.column("row").to_pylist() == [3, 4, 5]
    assert t.column(K.REJECT).to_pylist() == [""] * 3 and t.column("extra_images").null_count == 3
    # appending to an old catalogue is refused with a clear message instead of mixing versions
    storage.write_bytes(f"{base}/raw/items.jsonl", json.dumps({"product_id": "N1", "title": "new item",
                                                               "image": "../catalog/x.jpg"}).encode())
    with pytest.raises(ValueError, match="schema version 1"):
        prepare(f"{base}/raw/items.jsonl", f"{base}/catalog", PrepareOptions(progress=False))


# --------------------------------------------------------------------------------------------
# retries on transient network errors, through a real TCP proxy in front of the real server


class FlakyProxy:
    """Forwards 127.0.0.1:port to the S3 server but resets the first `fail` connections."""

    def __init__(self, target: str, fail: int):
        host, port = target.replace("http://", "").split(":")
        self.target = (host, int(port))
        self.fail = fail
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.fail:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # RST: "connection reset by peer"
                continue
            up = socket.create_connection(self.target)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(120)
def test_reads_retry_transient_connection_resets(s3):
    from gammaray.config import StorageConfig

    uri = s3.url("ingest", "flaky", "blob.bin")
    storage.write_bytes(uri, b"payload" * 100)
    proxy = FlakyProxy(s3.endpoint, fail=3)
    try:
        cfg = StorageConfig(endpoint_url=proxy.endpoint, retry_time_s=0)
        with pytest.raises(storage.StorageUnavailable, match=rf"storage at {proxy.endpoint} kept failing .* while "
                                                             rf"opening {uri} \(storage.retry_time_s=0\)"):
            storage.read_bytes(uri, cfg)
        cfg = StorageConfig(endpoint_url=proxy.endpoint, retry_time_s=30)
        assert storage.read_bytes(uri, cfg) == b"payload" * 100
        assert proxy.accepted >= 4
        # a host that is not the run's storage (an image URL) gets storage.retries attempts, then its own error
        proxy.fail, proxy.accepted = 10**9, 0
        native = storage.S3Settings.from_config(StorageConfig(endpoint_url=proxy.endpoint, retry_time_s=0)).pyarrow_fs()
        with pytest.raises(OSError) as err:
            storage.with_retries(lambda: native.get_file_info(uri[len("s3://"):]), f"reading {uri}", retries=2)
        assert not isinstance(err.value, storage.StorageUnavailable) and proxy.accepted == 3
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_stream_reads_ride_out_an_outage_and_never_quarantine_for_it(s3, damaged_catalogue):
    """Row groups read through a proxy that resets connections: with retry time left, every record
    comes back good; without, the read stops with StorageUnavailable instead of quarantining the
    records as unreadable_shard (what a main-branch stream did). A damaged shard is still data."""
    from gammaray.config import StorageConfig

    cat, m = damaged_catalogue["cat"], damaged_catalogue["manifest"]
    units = units_from_manifest(m)
    good_unit = next(i for i, u in enumerate(units) if u.shard.endswith("part-00000.parquet"))
    bad_unit = next(i for i, u in enumerate(units) if u.shard.endswith("part-00001.parquet"))
    proxy = FlakyProxy(s3.endpoint, fail=6)
    try:
        patient = storage.S3Settings.from_config(StorageConfig(endpoint_url=proxy.endpoint, retry_time_s=60))
        u = units[good_unit]
        t = read_segment_rows(cat, u, good_unit, 0, u.num_rows, 0, 1, True, patient)
        assert t.column(K.REJECT).to_pylist() == [""] * u.num_rows and proxy.accepted > 6
        b = units[bad_unit]
        t = read_segment_rows(cat, b, bad_unit, 0, b.num_rows, 0, 1, True, patient)
        assert set(t.column(K.REJECT).to_pylist()) == {Reason.UNREADABLE_SHARD}  # real damage: quarantined
        proxy.fail, proxy.accepted = 10**9, 0  # from now on the storage is down
        impatient = storage.S3Settings.from_config(StorageConfig(endpoint_url=proxy.endpoint, retry_time_s=2))
        with pytest.raises(storage.StorageUnavailable, match=rf"storage at {proxy.endpoint} kept failing"):
            read_segment_rows(cat, u, good_unit, 0, u.num_rows, 0, 1, True, impatient)
    finally:
        proxy.close()
