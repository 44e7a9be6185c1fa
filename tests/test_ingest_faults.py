"""Issue 13: every per-record fault is a quarantine reason, never an abort; image paths are confined to
the source folder; only a fault of the whole source stops a prepare, with one message.

Each case is a real source (files on disk, the session S3 server, a closed 127.0.0.1 port) holding
good records and one bad one; each asserts the bad record's reason and input = written + quarantined.
"""

from __future__ import annotations

import json
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gammaray.config import StorageConfig
from gammaray.schema import Reason
from pipelines import faults, storage
from pipelines.catalogue import PrepareError
from pipelines.prepare import PrepareOptions, load_manifest, prepare, read_quarantine

pytestmark = pytest.mark.ingest

OPTS = dict(progress=False, io_threads=2)
GOOD = 3


_HELD_PORTS: list[socket.socket] = []


def _closed_port() -> int:
    """A port where a connection is refused: bound here and kept bound, never listening, for the rest
    of the session. (Closing it at once let another process of the suite, a Ray worker's HTTP server
    say, take the number before the test connected: a 404 from it made an "outage" a missing image.)"""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(s)
    return s.getsockname()[1]


def _write_source(folder, bad: dict | None = None, bad_line: bytes | None = None) -> str:
    """folder/items.jsonl: GOOD good records (images in folder/img) and one bad record (or raw line)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(GOOD):
        (folder / "img" / f"g{i}.jpg").write_bytes(faults.good_jpeg(seed=i))
        lines.append(json.dumps({"product_id": f"G{i}", "title": f"good lamp {i}", "image": f"img/g{i}.jpg"}).encode())
    if bad is not None:
        lines.insert(1, json.dumps({"product_id": "BAD", "title": "a bad record"} | bad).encode())
    if bad_line is not None:
        lines.insert(1, bad_line)
    (folder / "items.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return str(folder / "items.jsonl")


def _check(res, reason: str, detail: str = "") -> dict:
    """One bad record with `reason`, the good ones written, input = written + quarantined."""
    assert res.quarantine_by_reason == {reason: 1}, res.summary()
    assert res.num_written == GOOD
    assert res.num_input == res.num_written + res.num_quarantined == GOOD + 1
    q = read_quarantine(res.dst).to_pylist()
    assert len(q) == 1 and q[0]["reason"] == reason and detail in q[0]["detail"], q
    assert load_manifest(res.dst)["quarantine"]["count"] == 1
    return q[0]


def _shard_bytes(dst: str) -> bytes:
    m = load_manifest(dst)
    return b"".join(storage.read_bytes(storage.join(dst, s["path"])) for s in m["shards"])


# --------------------------------------------------------------------------------------------
# the ten aborts of issue 13, each now a reason


def _deep(n: int) -> str:
    return "[" * n + "]" * n


CASES = {
    # case: (bad record fields | raw line, reason, detail substring)
    "image_is_a_directory": ({"image": "img"}, Reason.IMAGE_PATH_INVALID, "is a directory"),
    "image_path_with_nul_byte": ({"image": "img/g0.jpg\u0000.png"}, Reason.IMAGE_PATH_INVALID, "NUL byte"),
    "image_path_longer_than_the_os_allows": ({"image": "img/" + "x" * 300 + ".jpg"}, Reason.IMAGE_PATH_INVALID, "too long"),
    "image_path_over_path_max": ({"image": "img/" + "d/" * 2500 + "x.jpg"}, Reason.IMAGE_PATH_INVALID, "too long"),
    "attributes_list_of_non_pairs": ({"image": "img/g0.jpg", "attributes": [[["colour"], "red"]]}, Reason.WRONG_TYPE,
                                     "list of [key, value] pairs"),
    "attributes_list_of_strings": ({"image": "img/g0.jpg", "attributes": ["red", "large"]}, Reason.WRONG_TYPE,
                                   "list of [key, value] pairs"),
    "attributes_string_nested_too_deep": ({"image": "img/g0.jpg", "attributes": _deep(100_000)},
                                          Reason.NESTING_TOO_DEEP, "attributes"),
    "jsonl_line_nested_too_deep": (('{"product_id": "BAD", "title": "x", "image": "img/g0.jpg", "extra": '
                                    + _deep(100_000) + "}").encode(), Reason.NESTING_TOO_DEEP, "line 2"),
    "integer_too_long_to_convert": (b'{"product_id": ' + b"9" * 5000 + b', "title": "x", "image": "img/g0.jpg"}',
                                    Reason.WRONG_TYPE, "line 2"),
    "image_is_dev_zero_read_without_a_cap": ({"image": "/dev/zero"}, Reason.IMAGE_PATH_INVALID, "pseudo filesystem"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_record_is_quarantined_with_its_reason_not_an_abort(case, tmp_path):
    bad, reason, detail = CASES[case]
    src = _write_source(tmp_path / "raw", **({"bad_line": bad} if isinstance(bad, bytes) else {"bad": bad}))
    # /dev/zero is outside the source folder too: let it through confinement to reach the file-type rule
    opts = PrepareOptions(allow_outside_paths=case.endswith("dev_zero_read_without_a_cap"), **OPTS)
    _check(prepare(src, str(tmp_path / "catalog"), opts), reason, detail)


def test_csv_field_over_the_limit_is_field_too_large_and_the_rows_after_it_are_read(tmp_path):
    src = tmp_path / "raw"
    (src / "img").mkdir(parents=True)
    rows = ["product_id,title,image,description"]
    for i in range(GOOD):
        (src / "img" / f"g{i}.jpg").write_bytes(faults.good_jpeg(seed=i))
        rows.append(f"G{i},good lamp {i},img/g{i}.jpg,a lamp")
        if i == 0:
            rows.append('BAD,huge,img/g0.jpg,"' + "word " * 30_000 + '"')  # 150,000 characters
    (src / "items.csv").write_text("\n".join(rows) + "\n")
    _check(prepare(str(src / "items.csv"), str(tmp_path / "catalog"), PrepareOptions(**OPTS)),
           Reason.FIELD_TOO_LARGE, "longer than 131072")


def test_image_url_whose_host_does_not_answer_is_unreachable(tmp_path):
    src = _write_source(tmp_path / "raw", {"image": f"http://127.0.0.1:{_closed_port()}/lamp.jpg"})
    _check(prepare(src, str(tmp_path / "catalog"), PrepareOptions(**OPTS)), Reason.IMAGE_UNREACHABLE, "127.0.0.1")


def test_s3_image_the_credentials_cannot_reach(s3, tmp_path, monkeypatch):
    """Images in the session S3 server: a bucket that does not exist (the server answers 404), and a
    wrong secret key for the image storage (403)."""
    storage.write_bytes(s3.url("faults", "lamp.jpg"), faults.good_jpeg(seed=9))
    src = _write_source(tmp_path / "raw", {"image": "s3://no-such-bucket-gammaray/lamp.jpg"})
    _check(prepare(src, str(tmp_path / "catalog"), PrepareOptions(**OPTS)), Reason.IMAGE_NOT_FOUND, "no-such-bucket")

    monkeypatch.setenv("GAMMARAY_TEST_WRONG_SECRET", "not-the-secret")
    wrong = StorageConfig(secret_key_env="GAMMARAY_TEST_WRONG_SECRET", retries=0, retry_time_s=0)
    src = _write_source(tmp_path / "raw2", {"image": s3.url("faults", "lamp.jpg")})
    _check(prepare(src, str(tmp_path / "catalog2"), PrepareOptions(**OPTS), wrong), Reason.IMAGE_UNREACHABLE,
           "access denied")


def test_only_regular_files_are_read_and_the_size_cap_comes_before_reading(tmp_path):
    """A FIFO (opening it would wait forever for a writer), and a 64 GiB sparse file: quarantined from
    their type and size, without reading a byte (the test would hang or run out of memory otherwise)."""
    src = tmp_path / "raw"
    src.mkdir()
    os.mkfifo(src / "pipe.jpg")
    with open(src / "huge.jpg", "wb") as f:
        f.truncate(64 * 2**30)
    _check(prepare(_write_source(src, {"image": "pipe.jpg"}), str(tmp_path / "c1"), PrepareOptions(**OPTS)),
           Reason.IMAGE_PATH_INVALID, "not a regular file")
    _check(prepare(_write_source(src, {"image": "huge.jpg"}), str(tmp_path / "c2"), PrepareOptions(**OPTS)),
           Reason.IMAGE_TOO_LARGE, f"{64 * 2**30} bytes > limit {64 * 2**20}")
    # the cap is an option (data.max_image_bytes, --max-image-bytes); inline image bytes are held to it too
    _check(prepare(_parquet_source(src, big=faults.good_jpeg(side=200)), str(tmp_path / "c3"),
                   PrepareOptions(max_image_bytes=3000, **OPTS)), Reason.IMAGE_TOO_LARGE, "inline image")


def _parquet_source(folder, big: bytes) -> str:
    """A Parquet source with inline image bytes: GOOD small ones and one `big`."""
    imgs = [faults.good_jpeg(seed=i) for i in range(GOOD)]
    assert all(len(b) < 3000 for b in imgs) and len(big) > 3000
    t = pa.table({"product_id": [f"G{i}" for i in range(GOOD)] + ["BAD"],
                  "title": [f"good lamp {i}" for i in range(GOOD)] + ["big"], "image": imgs + [big]})
    pq.write_table(t, folder / "inline.parquet")
    return str(folder / "inline.parquet")


# --------------------------------------------------------------------------------------------
# source confinement


def _outside_cases(tmp_path) -> dict[str, str]:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(faults.good_jpeg(seed=7))
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "secret.jpg", raw / "img" / "link-out.jpg")
    return {"dotdot": "../elsewhere/secret.jpg", "absolute": str(outside / "secret.jpg"),
            "file_uri": f"file://{outside / 'secret.jpg'}", "symlink_out": "img/link-out.jpg"}


@pytest.mark.parametrize("how", ["dotdot", "absolute", "file_uri", "symlink_out"])
def test_image_paths_leaving_the_source_folder_are_quarantined_unless_allowed(how, tmp_path):
    ref = _outside_cases(tmp_path)[how]
    src = _write_source(tmp_path / "raw", {"image": ref})
    q = _check(prepare(src, str(tmp_path / "catalog"), PrepareOptions(**OPTS)), Reason.IMAGE_OUTSIDE_SOURCE,
               "outside the source folder")
    assert "--allow-outside-paths" in q["detail"]
    allowed = prepare(src, str(tmp_path / "catalog-allowed"), PrepareOptions(allow_outside_paths=True, **OPTS))
    assert (allowed.num_written, allowed.num_quarantined) == (GOOD + 1, 0)


def test_paths_inside_the_source_folder_and_object_store_uris_are_read(s3, tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "sub" / "inside.jpg").write_bytes(faults.good_jpeg(seed=3))
    os.symlink(raw / "sub" / "inside.jpg", raw / "link-in.jpg")
    storage.write_bytes(s3.url("faults", "remote.jpg"), faults.good_jpeg(seed=4))
    lines = [{"product_id": "ABS", "title": "absolute inside", "image": str(raw / "sub" / "inside.jpg")},
             {"product_id": "URI", "title": "file uri inside", "image": f"file://{raw / 'sub' / 'inside.jpg'}"},
             {"product_id": "DOT", "title": "dotdot staying inside", "image": "sub/../sub/inside.jpg"},
             {"product_id": "LNK", "title": "symlink inside", "image": "link-in.jpg"},
             {"product_id": "S3", "title": "object store", "image": s3.url("faults", "remote.jpg")}]
    (raw / "items.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    res = prepare(str(raw), str(tmp_path / "catalog"), PrepareOptions(**OPTS))
    assert (res.num_written, res.num_quarantined) == (5, 0), res.summary()


def test_a_non_local_source_can_name_no_local_file(s3, tmp_path):
    (tmp_path / "local.jpg").write_bytes(faults.good_jpeg(seed=5))
    base = s3.url("faults", "remote-src")
    storage.write_bytes(f"{base}/g.jpg", faults.good_jpeg(seed=6))
    lines = [{"product_id": "OK", "title": "relative to the s3 source", "image": "g.jpg"},
             {"product_id": "LOCAL", "title": "a local file", "image": str(tmp_path / "local.jpg")}]
    storage.write_bytes(f"{base}/items.jsonl", "\n".join(json.dumps(x) for x in lines).encode())
    res = prepare(f"{base}/items.jsonl", str(tmp_path / "catalog"), PrepareOptions(**OPTS))
    assert (res.num_written, res.quarantine_by_reason) == (1, {Reason.IMAGE_OUTSIDE_SOURCE: 1})
    assert "non-local source" in read_quarantine(str(tmp_path / "catalog")).to_pylist()[0]["detail"]


@pytest.mark.parametrize("flags,reason", [([], Reason.IMAGE_OUTSIDE_SOURCE),
                                          (["--no-image-check"], Reason.IMAGE_OUTSIDE_SOURCE),
                                          (["--no-image-check", "--allow-outside-paths"], Reason.IMAGE_PATH_INVALID)])
def test_proc_self_environ_never_reaches_a_shard(flags, reason, tmp_path, monkeypatch, capsys):
    """Issue 13: with --no-image-check, /proc/self/environ put the process environment (object-store
    keys) into a Parquet shard. Now: quarantined by confinement, and by the pseudo-filesystem rule even
    when outside paths are allowed."""
    from gammaray.app.cli import main

    secret = "gammaray-planted-secret-" + os.urandom(6).hex()
    monkeypatch.setenv("GAMMARAY_TEST_SECRET", secret)
    src = _write_source(tmp_path / "raw", {"image": "/proc/self/environ"})
    dst = str(tmp_path / "catalog")
    out = tmp_path / "counts.json"
    assert main(["prepare", src, dst, "--quiet", "--json", str(out), *flags]) == 0
    counts = json.loads(out.read_text())
    assert counts["quarantine_by_reason"] == {reason: 1} and counts["num_written"] == GOOD
    assert secret.encode() not in _shard_bytes(dst)
    for root, _, names in os.walk(dst):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), name


# --------------------------------------------------------------------------------------------
# faults of the whole source stop the run, with one message, committing nothing


def test_a_source_whose_storage_does_not_answer_stops_with_one_message(tmp_path, capsys):
    from gammaray.app.cli import main

    down = f"http://127.0.0.1:{_closed_port()}"
    rc = main(["prepare", "s3://gammaray-test/raw/items.jsonl", str(tmp_path / "catalog"), "--quiet",
               "--set", f"storage.endpoint_url={down}", "--set", "storage.retries=0", "--set", "storage.retry_time_s=0"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("gammaray prepare: error: cannot list source s3://gammaray-test/raw/items.jsonl")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "catalog" / "manifest.json")


def test_image_storage_down_mid_run_stops_before_anything_is_committed(tmp_path):
    """Images on an object store that stops answering: an outage, not N bad records."""
    down = StorageConfig(endpoint_url=f"http://127.0.0.1:{_closed_port()}", retries=0, retry_time_s=0)
    src = _write_source(tmp_path / "raw", {"image": "s3://gammaray-test/faults/lamp.jpg"})
    dst = str(tmp_path / "catalog")
    first = prepare(_write_source(tmp_path / "first"), dst, PrepareOptions(**OPTS))
    manifest = (tmp_path / "catalog" / "manifest.json").read_bytes()
    with pytest.raises(PrepareError, match="storage error reading image s3://gammaray-test/faults/lamp.jpg"):
        prepare(src, dst, PrepareOptions(**OPTS), down)
    assert (tmp_path / "catalog" / "manifest.json").read_bytes() == manifest  # the catalogue as it was
    assert load_manifest(dst)["num_records"] == first.num_written
