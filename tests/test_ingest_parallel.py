"""`gammaray prepare` on Ray writes the catalogue the in-process pass writes, byte for byte: shards,
id files, sample_index, quarantine entries and counts, manifest; on a hostile source cut into many
small chunks (JSON Lines byte ranges, Parquet row groups), and on an append that re-admits, repeats
and changes records. The ids are held by hash partitions in their own processes, never by the
driver; a collision of their 64-bit hashes never merges two products."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gammaray.schema import Reason
from pipelines import faults, ids, prepare_parallel
from pipelines.storage import Store
from pipelines.prepare import PrepareOptions, prepare

pytestmark = pytest.mark.ingest

OPTS = dict(progress=False, max_records_per_shard=7, row_group_size=3, max_record_bytes=900, max_text_chars=300)
PARALLEL = dict(cpus=2, parallel_min_bytes=0, chunk_bytes=300)  # every few lines a chunk of its own


def _record(pid: str, image: str = "img/g0.jpg", **more) -> dict:
    return {"product_id": pid, "title": f"oak lamp {pid}", "description": "a lamp", "category": "Home > Lamps",
            "image": image, **more}


def _hostile_source(raw) -> str:
    """A folder of JSONL (many chunks), CSV, a JSON array and a damaged Parquet file, holding most
    quarantine reasons prepare has, duplicates across chunks and files, and a blank and a last line
    without its newline."""
    (raw / "img").mkdir(parents=True)
    for i in range(3):
        (raw / "img" / f"g{i}.jpg").write_bytes(faults.good_jpeg(side=16, seed=i))
    (raw / "img" / "garbage.jpg").write_bytes(faults.undecodable_bytes())
    (raw / "img" / "truncated.jpg").write_bytes(faults.truncated_jpeg())
    (raw / "img" / "zero.jpg").write_bytes(b"")
    (raw / "img" / "fixme.jpg").write_bytes(faults.truncated_jpeg())  # fixed in place before the append
    lines = [json.dumps(_record(f"J{i}", f"img/g{i % 3}.jpg")).encode() for i in range(30)]
    lines[4] = json.dumps(_record("J2")).encode()                                  # duplicate, another chunk
    lines[7] = b'{"product_id": "J7", "title": '                                    # not JSON
    lines[9] = b"[1, 2]"                                                            # not an object
    lines[11] = faults.non_utf8_line(_record("J11"))
    lines[13] = json.dumps(_record("J13", description="word " * 400)).encode()     # over max_record_bytes
    lines[15] = json.dumps(_record("J15", "img/garbage.jpg")).encode()
    lines[17] = json.dumps(_record("J17", "img/truncated.jpg")).encode()
    lines[19] = json.dumps(_record("J19", "img/zero.jpg")).encode()
    lines[21] = json.dumps(_record("J21", "img/missing.jpg")).encode()
    lines[23] = json.dumps(_record("J23", title="   ")).encode()
    lines[25] = json.dumps(_record("J25", "img/fixme.jpg")).encode()
    lines[26] = json.dumps(_record("J26", description="x " * 200)).encode()        # over max_text_chars
    lines[27] = b""
    (raw / "a.jsonl").write_bytes(b"\n".join(lines))                                # no newline at the end
    csv = ["product_id,title,image", "C0,lamp c0,img/g0.jpg", 'C1,"lamp c1,img/g1.jpg', "C2,lamp c2,img/g2.jpg",
           "J3,lamp dup,img/g0.jpg", "C4,lamp c4,img/g1.jpg"]
    (raw / "b.csv").write_text("\n".join(csv) + "\n")
    (raw / "c.json").write_text(json.dumps([_record("A0"), _record("A1", "img/zero.jpg"), 5]))
    t = pa.table({"product_id": [f"D{i}" for i in range(8)], "title": [f"damaged {i}" for i in range(8)],
                  "image": [faults.good_jpeg(side=16, seed=9)] * 8})
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=4)
    (raw / "d.parquet").write_bytes(faults.corrupt_row_group(buf.getvalue(), 0))
    return str(raw)


def _files(dst) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(dst):
        for name in names:
            if name != "prepare.lock":
                path = os.path.join(folder, name)
                out[os.path.relpath(path, dst)] = open(path, "rb").read()
    return out


def _same(a, b) -> None:
    ja, jb = a.to_json(), b.to_json()
    for j in (ja, jb):
        j.pop("wall_s")
        j["shards_written"] = [os.path.basename(s) for s in j["shards_written"]]
    assert ja == jb
    fa, fb = _files(a.dst), _files(b.dst)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []


def test_parallel_prepare_writes_what_the_in_process_one_writes(ray_local, tmp_path):
    src = _hostile_source(tmp_path / "raw")
    # the Parquet file is read by one task per row group (its first one damaged), numbered as one
    chunks = list(prepare_parallel.plan_chunks([src + "/d.parquet"], PARALLEL["chunk_bytes"], Store.of()))
    assert [c.row_groups for c in chunks] == [(0, 1), (1, 2)]
    one = prepare(src, str(tmp_path / "one"), PrepareOptions(cpus=1, **OPTS))
    par = prepare(src, str(tmp_path / "par"), PrepareOptions(**PARALLEL, **OPTS))
    assert one.quarantine_by_reason == {
        Reason.DUPLICATE_ID: 2, Reason.WRONG_TYPE: 3, Reason.NON_UTF8_TEXT: 1, Reason.OVERSIZED_RECORD: 1,
        Reason.IMAGE_UNDECODABLE: 1, Reason.IMAGE_TRUNCATED: 2, Reason.IMAGE_EMPTY: 2, Reason.IMAGE_NOT_FOUND: 1,
        Reason.EMPTY_TEXT: 1, Reason.OVERSIZED_TEXT: 1, Reason.UNCLOSED_QUOTE: 1, Reason.UNREADABLE_SHARD: 4}, \
        one.summary()
    assert one.num_written == 30 - 13 + 3 + 1 + 4 and len(one.shards_written) == 4
    _same(one, par)
    _partitioned(par, known=0, new=par.num_written)

    # the append: a fixed image re-admits its record, a catalogued row edited at the source is
    # reported, the same bad rows are repeats, new records follow (one a duplicate of a catalogued
    # id, one of a new one)
    (tmp_path / "raw" / "img" / "fixme.jpg").write_bytes(faults.good_jpeg(side=16, seed=5))
    a = (tmp_path / "raw" / "a.jsonl").read_bytes().split(b"\n")
    a[0] = json.dumps(_record("J0", title="oak lamp, edited")).encode()
    (tmp_path / "raw" / "a.jsonl").write_bytes(b"\n".join(a))
    more = [_record(f"N{i}", f"img/g{i % 3}.jpg") for i in range(9)] + [_record("J1", "img/g2.jpg"), _record("N3")]
    (tmp_path / "raw" / "e.jsonl").write_text("\n".join(json.dumps(r) for r in more) + "\n")
    one = prepare(src, str(tmp_path / "one"), PrepareOptions(cpus=1, **OPTS))
    par = prepare(src, str(tmp_path / "par"), PrepareOptions(**PARALLEL, **OPTS))
    assert (one.num_written, one.num_readmitted, one.changed_ids) == (10, 1, ["J0"]), one.summary()
    assert (one.num_already_quarantined, one.quarantine_by_reason) == (19, {Reason.DUPLICATE_ID: 2}), one.summary()
    _same(one, par)
    _partitioned(par, known=par.manifest["num_records"] - 10, new=10)
    # J1 (in the catalogue: its partition's old part) and N3 (added by this run: the new part) met again
    dups = pq.read_table(tmp_path / "par" / par.manifest["quarantine"]["files"][0]).to_pylist()
    assert sorted((e["product_id"], e["source"].rsplit("/", 1)[-1]) for e in dups
                  if e["reason"] == Reason.DUPLICATE_ID and e["source"].endswith("e.jsonl")) == [("J1", "e.jsonl"),
                                                                                                ("N3", "e.jsonl")]


def _partitioned(res, known: int, new: int) -> None:
    """The ids were held by 2 partition owners, not by the driver: each in its own process, holding
    only hashes of its range, together the whole catalogue (known: its ids before this run)."""
    parts = res.id_partitions
    assert [p["index"] for p in parts] == [0, 1] and all(p["count"] == 2 for p in parts)
    assert os.getpid() not in {p["process"] for p in parts} and len({p["process"] for p in parts}) == 2
    assert all(p["lo"] <= p["min_hash"] <= p["max_hash"] < p["hi"] for p in parts if p["min_hash"] is not None)
    assert (sum(p["num_known"] for p in parts), sum(p["num_new"] for p in parts)) == (known, new)
    assert all(p["num_known"] + p["num_new"] > 0 for p in parts)


def test_a_hash_collision_never_merges_two_products(ray_local, tmp_path, monkeypatch):
    """Every id hashed to one of two values: each lookup compares strings, read back from the
    partition's spill file; the catalogue is the one an honest hash gives, in one process and on
    Ray (where the driver, the chunk tasks and the partition owners all hash alike)."""
    part = ids.IdPartition(hash_fn=lambda p: 7)
    part.load(np.full(4, 7), ["a", "b", "c", "d"], np.array([1, 0, 3, 4]), np.array([True, False, True, True]))
    table = ids.PartitionedIds([part], hash_fn=lambda p: 7)
    table.num_known = part.finish_load()
    assert [p in table for p in "abcde"] == [True, True, True, True, False]
    asked = ["a", "e", "e", "a", "b", "c", "f", "d"]
    add = np.array([False, True, True, False, False, False, False, True])
    verdicts = table.decide(asked, add, np.array([1, 0, 0, 1, 5, 9, 0, 0]), ~add)()
    assert verdicts.tolist() == [ids.ALREADY, ids.NEW, ids.DUPLICATE, ids.AGAIN, ids.ALREADY, ids.CHANGED,
                                 ids.NOT_KNOWN, ids.ALREADY]
    assert table.is_new(["e", "a", "f"]).tolist() == [True, False, False]

    # three partitions: every id goes to the owner of its hash range, and only there
    parts = [ids.IdPartition(j, 3) for j in range(3)]
    spread = ids.PartitionedIds(parts)
    pids = [f"P{i}" for i in range(300)]
    assert (spread.decide(pids + pids[:5], np.ones(305, bool), np.zeros(305, np.int64), np.zeros(305, bool))()
            == [ids.NEW] * 300 + [ids.DUPLICATE] * 5).all()
    stats = spread.stats()
    assert sum(s["num_new"] for s in stats) == 300 and min(s["num_new"] for s in stats) > 50
    assert all(s["lo"] <= s["min_hash"] <= s["max_hash"] < s["hi"] for s in stats)

    src = _hostile_source(tmp_path / "raw")
    honest = prepare(src, str(tmp_path / "honest"), PrepareOptions(cpus=1, **OPTS))
    monkeypatch.setattr(ids, "id_hash", lambda p: len(p) % 2)
    monkeypatch.setattr(ids, "SPILL_BYTES", 1)  # every string in the file: read back for each comparison
    colliding = prepare(src, str(tmp_path / "colliding"), PrepareOptions(cpus=1, **OPTS))
    _same(honest, colliding)
    (tmp_path / "raw" / "e.jsonl").write_text("\n".join(json.dumps(_record(f"N{i}")) for i in range(12)) + "\n")
    colliding = prepare(src, str(tmp_path / "colliding"), PrepareOptions(cpus=1, **OPTS))
    par = prepare(src, str(tmp_path / "colliding-par"), PrepareOptions(**PARALLEL, **OPTS))
    monkeypatch.undo()
    honest = prepare(src, str(tmp_path / "honest"), PrepareOptions(cpus=1, **OPTS))
    assert honest.num_written == 12 and honest.num_already_present > 0
    _same(honest, colliding)
    fresh = prepare(src, str(tmp_path / "fresh"), PrepareOptions(cpus=1, **OPTS))
    _same(fresh, par)


def test_a_fault_of_a_chunk_is_raised_where_the_source_order_reaches_it(ray_local, tmp_path):
    """A Ray Data task returns its chunk's fault (here: a CSV file gone before its task reads it) as
    the chunk's last row; the driver gets every batch before it, then the same PrepareError naming
    the file that the in-process pass raises."""
    from pipelines.catalogue import PrepareError
    from pipelines.prepare_records import image_policy
    from pipelines.storage import Store

    ok = tmp_path / "ok.jsonl"
    ok.write_text("\n".join(json.dumps(_record(f"K{i}")) for i in range(5)) + "\n")
    gone = str(tmp_path / "gone.csv")
    opts = PrepareOptions(**PARALLEL, **OPTS)
    got = []
    with pytest.raises(PrepareError, match="cannot read source file .*gone.csv"):
        for batch in prepare_parallel.parallel_items([str(ok), gone], opts, Store.of(None), image_policy(opts, str(tmp_path)),
                                                     ids.PartitionedIds([]), 2):
            got += [(os.path.basename(source), row) for source, row, _, _ in batch]
    assert got == [("ok.jsonl", i) for i in range(5)]
