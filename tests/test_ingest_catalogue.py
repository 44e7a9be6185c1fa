"""Issue 16, prepare integrity: the manifest is committed atomically, one prepare writes a catalogue at
a time (a clear refusal for the second, a documented stale-lock rule), quarantined records are counted
once whatever the source path spelling, a record fixed in place is re-admitted, and a destination
inside the source is refused. Real files, a real rlimit, real threads, the session S3 server."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gammaray.schema import Reason
from pipelines import faults, storage
from pipelines.catalogue import STALE_AFTER_S, CatalogueBusy, PrepareError, WriterLock
from pipelines.prepare import PrepareOptions, load_manifest, prepare, read_quarantine

pytestmark = pytest.mark.ingest

OPTS = dict(progress=False, io_threads=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(n: int, prefix: str) -> list[dict]:
    return [{"product_id": f"{prefix}{i:03d}", "title": f"{prefix} lamp {i}", "image": f"img/{prefix}{i:03d}.jpg"}
            for i in range(n)]


def _write(src: str, records: list[dict], images: dict[str, bytes] | None = None) -> None:
    """records as src (a JSONL URI, local or s3://), their images beside it (good JPEGs by default)."""
    folder = storage.parent(src)
    for i, r in enumerate(records):
        name = r["image"]
        data = (images or {}).get(name) or faults.good_jpeg(side=24, seed=i)
        storage.write_bytes(storage.join(folder, name), data)
    storage.write_bytes(src, "\n".join(json.dumps(r) for r in records).encode())


def _catalogue_ids(dst: str) -> list[str]:
    m = load_manifest(dst)
    rows = []
    for s in m["shards"]:
        rows += pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(dst, s["path"]))),
                              columns=["product_id", "sample_index"]).to_pylist()
    assert sorted(r["sample_index"] for r in rows) == list(range(len(rows))) == list(range(m["num_records"]))
    return sorted(r["product_id"] for r in rows)


# --------------------------------------------------------------------------------------------
# atomic manifest


def test_manifest_survives_a_disk_full_in_the_middle_of_its_write(tmp_path):
    """A real fault: the prepare process runs under RLIMIT_FSIZE, so the manifest (the largest file an
    appending run writes) hits EFBIG half way. The old manifest must be intact, the catalogue usable,
    and the same command must then finish the job."""
    dst = str(tmp_path / "catalog")
    records = [r | {"category": f"Lamps > Shade {i:03d} " + "x" * 400} for i, r in enumerate(_records(61, "A"))]
    _write(str(tmp_path / "v1" / "items.jsonl"), records[:60])  # 60 shards and long categories: a big manifest
    prepare(str(tmp_path / "v1" / "items.jsonl"), dst, PrepareOptions(max_records_per_shard=1, **OPTS))
    before = (tmp_path / "catalog" / "manifest.json").read_bytes()
    biggest_shard = max(os.path.getsize(tmp_path / "catalog" / s["path"]) for s in load_manifest(dst)["shards"])
    limit = len(before) // 2
    assert biggest_shard < limit < len(before), (biggest_shard, len(before))  # only the manifest hits the limit

    _write(str(tmp_path / "v2" / "items.jsonl"), records)  # one more record to append
    cmd = [sys.executable, "-c", "import sys; from pipelines.prepare import PrepareOptions, prepare; "
           "prepare(sys.argv[1], sys.argv[2], PrepareOptions(max_records_per_shard=1, progress=False))",
           str(tmp_path / "v2" / "items.jsonl"), dst]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    limited = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert limited.returncode != 0 and "File too large" in limited.stderr, limited.stderr[-2000:]
    assert (tmp_path / "catalog" / "manifest.json").read_bytes() == before
    assert len(_catalogue_ids(dst)) == 60
    assert not [f for f in os.listdir(tmp_path / "catalog") if ".tmp-" in f]  # the half-written temp file is gone

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(_catalogue_ids(dst)) == 61


def test_a_damaged_manifest_is_named_in_a_clear_error(tmp_path):
    dst = tmp_path / "catalog"
    dst.mkdir()
    (dst / "manifest.json").write_text('{"schema_version": 2, "num_records": 4, "sha')
    with pytest.raises(ValueError, match=r"manifest.json is damaged \(44 bytes"):
        load_manifest(str(dst))


# --------------------------------------------------------------------------------------------
# one writer at a time


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(where, s3, tmp_path, capsys):
    from gammaray.app.cli import main

    dst = str(tmp_path / "catalog") if where == "local" else s3.url("catalogue", "busy", "catalog")
    src = str(tmp_path / "raw" / "items.jsonl")
    _write(src, _records(5, "L"))
    with WriterLock(dst):  # another prepare, as far as the second one can tell
        assert main(["prepare", src, dst, "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "is being written by another prepare" in err and f"pid {os.getpid()}" in err
        assert socket.gethostname() in err and "Traceback" not in err
    res = prepare(src, dst, PrepareOptions(**OPTS))  # released: the next prepare goes ahead
    assert res.num_written == 5
    assert not storage.exists(storage.join(dst, "prepare.lock"))  # and released its own lock


def test_two_prepares_started_together_into_one_catalogue_lose_nothing(s3):
    """Two real prepares in threads, released by one barrier, appending different sources to the same
    S3 catalogue: every run that reports success has all its records in the catalogue (before the lock,
    the later manifest silently dropped the other run's shards)."""
    base = s3.url("catalogue", "race")
    dst = f"{base}/catalog"
    srcs = {p: f"{base}/raw-{p}/items.jsonl" for p in "AB"}
    for p, src in srcs.items():
        _write(src, _records(60, p))
    barrier = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def run(p: str) -> None:
        barrier.wait()
        try:
            outcome[p] = prepare(srcs[p], dst, PrepareOptions(max_records_per_shard=16, **OPTS))
        except CatalogueBusy as err:
            outcome[p] = err

    threads = [threading.Thread(target=run, args=(p,)) for p in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    succeeded = [p for p in "AB" if not isinstance(outcome[p], Exception)]
    assert succeeded, outcome
    assert _catalogue_ids(dst) == sorted(r["product_id"] for p in succeeded for r in _records(60, p))
    for p in set("AB") - set(succeeded):  # refused: running it again appends it
        assert "being written by another prepare" in str(outcome[p])
        prepare(srcs[p], dst, PrepareOptions(**OPTS))
    assert len(_catalogue_ids(dst)) == 120


def _plant_lock(uri: str, **info) -> None:
    now = time.time()
    storage.write_bytes(uri, json.dumps({"owner": "someone@elsewhere", "host": "elsewhere", "pid": 1,
                                         "started_at": now, "heartbeat_at": now, **info}).encode())


def test_s3_lock_stale_rule(s3, tmp_path):
    """Taken over: a lock whose process on this host is gone, or whose heartbeat is older than
    STALE_AFTER_S. Refused: a fresh lock of another host."""
    src = str(tmp_path / "raw" / "items.jsonl")
    _write(src, _records(3, "S"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cases = {"dead-pid-here": dict(host=socket.gethostname(), pid=gone.pid),
             "old-heartbeat": dict(heartbeat_at=time.time() - STALE_AFTER_S - 60)}
    for name, info in cases.items():
        dst = s3.url("catalogue", "stale", name)
        _plant_lock(storage.join(dst, "prepare.lock"), **info)
        assert prepare(src, dst, PrepareOptions(**OPTS)).num_written == 3, name
        assert not storage.exists(storage.join(dst, "prepare.lock"))
    dst = s3.url("catalogue", "stale", "fresh")
    _plant_lock(storage.join(dst, "prepare.lock"))
    with pytest.raises(CatalogueBusy, match=r"someone@elsewhere pid 1, .*goes stale 600 s after its last heartbeat"):
        prepare(src, dst, PrepareOptions(**OPTS))
    assert not storage.exists(storage.join(dst, "manifest.json"))


def test_s3_lock_heartbeat_and_losing_the_lock(s3):
    uri = s3.url("catalogue", "beat", "catalog")
    lock = WriterLock(uri, heartbeat_s=0.2).__enter__()
    try:
        first = json.loads(storage.read_bytes(storage.join(uri, "prepare.lock")))
        later = first
        for _ in range(100):  # a beat every 0.2 s; allow for a loaded machine
            time.sleep(0.1)
            later = json.loads(storage.read_bytes(storage.join(uri, "prepare.lock")))
            if later["heartbeat_at"] > first["heartbeat_at"]:
                break
        assert later["heartbeat_at"] > first["heartbeat_at"] and later["started_at"] == first["started_at"]
        assert later["pid"] == os.getpid()
        lock.check()
        _plant_lock(storage.join(uri, "prepare.lock"))  # someone else took it over
        for _ in range(100):
            time.sleep(0.1)
            if lock._lost:
                break
        with pytest.raises(PrepareError, match="taken over by another prepare"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(storage.read_bytes(storage.join(uri, "prepare.lock")))["owner"] == "someone@elsewhere"


# --------------------------------------------------------------------------------------------
# quarantine identity: product_id + content, not path spelling


def _bad_catalogue(folder) -> str:
    """folder/items.jsonl: 4 good records and 3 bad ones (undecodable image, empty title, missing image)."""
    recs = _records(4, "G") + [{"product_id": "X1", "title": "broken photo", "image": "img/X1.jpg"},
                               {"product_id": "X2", "title": "   ", "image": "img/G000.jpg"},
                               {"product_id": "X3", "title": "no photo", "image": "img/nope.jpg"}]
    _write(str(folder / "items.jsonl"), recs[:4])
    (folder / "img" / "X1.jpg").write_bytes(faults.undecodable_bytes())
    (folder / "items.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    return str(folder / "items.jsonl")


def test_quarantine_counts_distinct_records_whatever_the_source_spelling(tmp_path, monkeypatch):
    """Issue 16: naming the same file as absolute, relative or file:// grew the quarantine count that
    feeds the training gate (40 -> 151 over four runs). A copy of the file under another name holds
    the same records, so it does not grow it either."""
    src = _bad_catalogue(tmp_path / "raw")
    os.symlink(tmp_path / "raw", tmp_path / "raw-link")
    dst = str(tmp_path / "catalog")
    monkeypatch.chdir(tmp_path)
    spellings = [src, "raw/items.jsonl", f"file://{src}", str(tmp_path / "raw-link" / "items.jsonl"),
                 "./raw//items.jsonl"]
    for i, spelling in enumerate(spellings):
        res = prepare(spelling, dst, PrepareOptions(**OPTS))
        assert res.num_input == res.num_written + res.num_already_present + res.num_quarantined + res.num_already_quarantined
        m = load_manifest(dst)
        assert m["quarantine"]["count"] == 3 and m["num_records"] == 4, (spelling, m["quarantine"])
        assert m["sources"] == [src]
        if i:
            assert (res.num_written, res.num_quarantined, res.num_already_quarantined) == (0, 0, 3)
    assert sorted(r["product_id"] for r in read_quarantine(dst).to_pylist()) == ["X1", "X2", "X3"]
    (tmp_path / "raw" / "copy.jsonl").write_bytes((tmp_path / "raw" / "items.jsonl").read_bytes())
    prepare(str(tmp_path / "raw" / "copy.jsonl"), dst, PrepareOptions(**OPTS))
    assert load_manifest(dst)["quarantine"]["count"] == 3


def test_a_record_fixed_in_place_is_readmitted(s3):
    """A bad image file replaced, a bad row edited: the next prepare admits both and the quarantine
    count (what the training gate reads) drops to zero. Source and catalogue in the S3 server."""
    base = s3.url("catalogue", "fixed")
    src, dst = f"{base}/raw/items.jsonl", f"{base}/catalog"
    recs = _records(4, "G") + [{"product_id": "X1", "title": "broken photo", "image": "img/X1.jpg"},
                               {"product_id": "X2", "title": "", "image": "img/G000.jpg"}]
    _write(src, recs, images={"img/X1.jpg": faults.undecodable_bytes()})
    first = prepare(src, dst, PrepareOptions(**OPTS))
    assert first.quarantine_by_reason == {Reason.IMAGE_UNDECODABLE: 1, Reason.EMPTY_TEXT: 1}
    assert load_manifest(dst)["quarantine"]["count"] == 2

    storage.write_bytes(f"{base}/raw/img/X1.jpg", faults.good_jpeg(side=24, seed=99))  # the photo, fixed in place
    recs[5]["title"] = "a lamp with a title now"                                         # the row, fixed in place
    storage.write_bytes(src, "\n".join(json.dumps(r) for r in recs).encode())
    again = prepare(src, dst, PrepareOptions(**OPTS))
    assert (again.num_written, again.num_already_present, again.num_readmitted, again.num_quarantined) == (2, 4, 2, 0)
    m = load_manifest(dst)
    assert m["quarantine"] == {"count": 0, "by_reason": {}, "files": []}
    assert read_quarantine(dst).num_rows == 0 and _catalogue_ids(dst) == sorted(r["product_id"] for r in recs)
    assert not storage.list_files(f"{dst}/quarantine")  # the superseded quarantine file is gone
    assert "re-admitted        2" in again.summary()


# --------------------------------------------------------------------------------------------
# a destination inside the source


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_destination_inside_the_source_is_refused(where, s3, tmp_path):
    base = str(tmp_path / "raw") if where == "local" else s3.url("catalogue", "inside", "raw")
    _write(storage.join(base, "items.jsonl"), _records(3, "I"))
    for dst in (storage.join(base, "catalog"), base, storage.join(base, "a", "b")):
        with pytest.raises(PrepareError, match="is inside the source folder"):
            prepare(base, dst, PrepareOptions(**OPTS))
        assert not storage.exists(storage.join(dst, "manifest.json"))
    beside = base + "-catalog"  # a sibling whose name starts like the source is not inside it
    assert prepare(base, beside, PrepareOptions(**OPTS)).num_written == 3
    assert prepare(storage.join(base, "items.jsonl"), storage.join(base, "catalog"), PrepareOptions(**OPTS)).num_written == 3


# --------------------------------------------------------------------------------------------
# the shard index


def test_shard_index_round_trips_and_old_manifests_still_load(tmp_path):
    """manifest.json is a small header naming a Parquet index of shards; the index gives back every
    shard as written, the header carries the catalogue hash of the old formula, an append replaces
    the index, and a catalogue of the old layout (the shard list inside manifest.json) is read as it
    is and migrated by `migrate`."""
    import hashlib

    from pipelines.catalogue import manifest_sha256, migrate, unit_table

    dst = str(tmp_path / "catalog")
    records = _records(7, "A")
    _write(str(tmp_path / "v1" / "items.jsonl"), records[:5])
    res = prepare(str(tmp_path / "v1" / "items.jsonl"), dst, PrepareOptions(max_records_per_shard=2, row_group_size=1,
                                                                            **OPTS))
    header = json.loads((tmp_path / "catalog" / "manifest.json").read_bytes())
    assert "shards" not in header and header["index"]["num_shards"] == 3 and header["index"]["num_row_groups"] == 5
    m = load_manifest(dst)
    assert m["shards"] == res.manifest["shards"]  # every key of every shard back from the index
    legacy = [[s["path"], int(s["num_rows"]), list(s["row_groups"]), s.get("sha256")] for s in m["shards"]]
    assert header["catalogue_sha256"] == hashlib.sha256(json.dumps(legacy, separators=(",", ":")).encode()).hexdigest()
    units = unit_table(load_manifest(dst))  # straight from the index's columns
    assert [(u.shard, u.row_group, u.num_rows, u.first_row) for u in units] == [
        (s["path"], g, 1, g) for s in m["shards"] for g in range(len(s["row_groups"]))]
    old_index = header["index"]["path"]

    _write(str(tmp_path / "v2" / "items.jsonl"), records)
    prepare(str(tmp_path / "v2" / "items.jsonl"), dst, PrepareOptions(max_records_per_shard=2, row_group_size=1, **OPTS))
    header2 = json.loads((tmp_path / "catalog" / "manifest.json").read_bytes())
    assert header2["index"]["num_shards"] == 4 and header2["index"]["path"] != old_index
    assert not (tmp_path / "catalog" / old_index).exists()  # the superseded index is removed after the commit
    assert len(_catalogue_ids(dst)) == 7

    # the old layout: the full shard list in manifest.json, no index
    full = load_manifest(dst)
    old = {k: v for k, v in dict(full).items() if k not in ("index", "catalogue_sha256")} | {"shards": full["shards"]}
    (tmp_path / "catalog" / "manifest.json").write_text(json.dumps(old))
    m_old = load_manifest(dst)
    assert manifest_sha256(m_old) == header2["catalogue_sha256"]  # resume identities survive the migration
    assert unit_table(m_old) == unit_table(full) and len(_catalogue_ids(dst)) == 7
    assert migrate(dst) is True and migrate(dst) is False
    assert json.loads((tmp_path / "catalog" / "manifest.json").read_bytes())["catalogue_sha256"] == header2["catalogue_sha256"]


    # the tokenizer's texts: all of them in catalogue order, or a seeded sample of whole row groups
    from pipelines.tokenizer import catalogue_texts

    titles = [r["title"] for r in records]
    m = load_manifest(dst)
    assert list(catalogue_texts(dst, m)) == titles
    sample = list(catalogue_texts(dst, m, sample=4, seed=0))
    assert len(sample) == 4 and set(sample) < set(titles) and sample == list(catalogue_texts(dst, m, sample=4, seed=0))
    assert {tuple(catalogue_texts(dst, m, sample=4, seed=s)) for s in range(6)} != {tuple(sample)}


_TRAIN_ONE = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from pipelines.synthetic import write_raw_catalogue
from pipelines.tokenizer import train_wordpiece
paths = write_raw_catalogue(sys.argv[2] + "/raw", n_train=600, n_val=0, seed=0)
texts = [t for line in open(paths["train"]) for r in [json.loads(line)]
         for t in (r.get("title"), r.get("description"), r.get("category")) if t]
out = train_wordpiece(iter(texts), sys.argv[2] + "/tok", vocab_size=400, parallel=sys.argv[3] == "1")
state = json.load(open(out + "/tokenizer.json"))
print(json.dumps({"vocab": hashlib.sha256(json.dumps(state["model"]["vocab"], sort_keys=True).encode()).hexdigest(),
                  "size": len(state["model"]["vocab"]), "added": [t["content"] for t in state["added_tokens"]]}))
"""


@pytest.mark.timeout(300)
def test_the_same_texts_train_the_same_tokenizer_in_every_process(tmp_path):
    """HF tokenizers' WordPiece trainer alone learns a slightly different vocabulary in every process
    (huggingface/tokenizers#1794); train_wordpiece seeds the continuing pieces so that it does not."""
    runs = []
    for i, parallel in enumerate(("1", "1", "0")):
        d = tmp_path / f"run{i}"
        d.mkdir()
        proc = subprocess.run([sys.executable, "-c", _TRAIN_ONE, ROOT, str(d), parallel], capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert len({r["vocab"] for r in runs}) == 1, runs
    # the seeded pieces are ordinary vocabulary again: only the five special tokens are special
    assert runs[0]["added"] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 100 < runs[0]["size"] <= 400
