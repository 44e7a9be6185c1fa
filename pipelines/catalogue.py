"""A prepared catalogue's manifest: read it, commit it atomically, one writer at a time.

`DST/manifest.json` is the catalogue: a shard or quarantine file it does not name does not exist
for any reader, so a prepare that stops half way leaves the catalogue as it was.

- **A small header and an index of shards.** manifest.json holds the counts, the schema version, the
  sources, the quarantine, the catalogue's identity hash (`catalogue_sha256`) and the name of the
  shard index: a Parquet table `DST/index/shards-<hash>.parquet` with one row per shard (path, rows,
  the row counts of its row groups, content hash). Readers load the header (a few KB whatever the
  catalogue's size) and the index only when they need it, as numpy columns (`unit_table`), never one
  Python object per shard; the run identity of a resume is the header's hash. The index is written
  under a new name before the header is committed, so the commit stays one atomic replace.
  Catalogues written before the index (manifest.json with the full `shards` list) are still read as
  they are; the next commit into one (an append, or `migrate`) writes the new layout.

- **Atomic commit.** Local: the manifest is written to a temporary file in the same folder, fsync'ed,
  then renamed over the old one (`os.replace`): a reader sees the old or the new file, never a
  truncated one. S3: one PUT replaces an object whole; it is made conditional (`If-Match` the ETag
  read at the start, `If-None-Match: *` for a new catalogue), so a writer whose lock was taken over
  cannot overwrite another's commit (checked on SeaweedFS 4.48; AWS S3 has supported both headers on
  PUT since 2024).
- **One writer at a time** (`WriterLock`, file `DST/prepare.lock`). Local: an exclusive `flock` on the
  file; the OS drops it when the process ends, however it ends, so a local lock never goes stale. S3:
  the lock object is created with `If-None-Match: *` (the second writer gets 412 and is refused with
  the owner's name) and rewritten every `HEARTBEAT_S` seconds. It is stale, and the next prepare takes
  it over (a PUT `If-Match` its ETag: only one taker wins), when its owner ran on this host and that
  process is gone, or when its heartbeat is older than `STALE_AFTER_S` (clocks of the hosts must
  agree to within a minute or so). Other fsspec destinations get no lock.

Length (about 510 lines): the header, its shard index and the writer lock are one commit protocol.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.config import StorageConfig
from gammaray.schema import check_readable

from . import storage
from .storage import Store

MANIFEST = "manifest.json"
INDEX_DIR = "index"
INDEX_FORMAT = 1
INDEX_ROW_GROUP = 8192  # shards per row group of the index: a reader holds one decoded piece at a time
_INDEX_KEYS = ("path", "num_rows", "row_groups", "sha256")  # columns of the index; other shard keys go to `extra`
LOCK = "prepare.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class PrepareError(RuntimeError):
    """Stops a prepare with one message; nothing of the run is committed."""


class CatalogueBusy(PrepareError):
    """Another prepare holds the destination's lock."""


# --------------------------------------------------------------------------------------------
# the manifest


class Manifest(dict):
    """A manifest's header as a dict. `manifest["shards"]` (the full list of shard dicts) is read from
    the index on first use, for code that wants it; readers that need only the row groups use
    `unit_table(manifest)`, which reads two columns of the index straight into numpy."""

    def __init__(self, header: dict, uri: str | None = None, store: Store | None = None):
        super().__init__(header)
        self.uri = uri
        self.store = Store.of(store)

    def __missing__(self, key):
        if key == "shards" and "index" in self:
            shards = read_index(self.uri, self["index"], self.store).to_pylist()
            self["shards"] = [_shard_dict(s) for s in shards]
            return self["shards"]
        raise KeyError(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or (key == "shards" and super().__contains__("index"))


def load_manifest(uri: str, storage_cfg: Store | StorageConfig | None = None) -> Manifest:
    """The manifest of the catalogue at uri (for readers: training, eval, embed): the header, with
    the shard index read lazily."""
    manifest, _ = _read_header(uri, Store.of(storage_cfg))
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json under {uri}: run `gammaray prepare` first")
    return manifest


def read_manifest(dst: str, storage_cfg: Store | StorageConfig | None = None) -> tuple[dict | None, str | None]:
    """For a writer: (manifest or None when there is none, the version token a conditional commit
    needs). The manifest has its full `shards` list, to append to and pass to `commit_manifest`."""
    manifest, etag = _read_header(dst, Store.of(storage_cfg))
    if manifest is not None:
        manifest["shards"]  # noqa: B018 - read the index now: the writer appends to the list
    return manifest, etag


def _read_header(dst: str, store: Store) -> tuple[Manifest | None, str | None]:
    uri = storage.join(dst, MANIFEST)
    etag = None
    if storage.is_remote(uri):
        fs = store.s3fs()
        try:
            with fs.open(_s3_path(uri), "rb") as f:  # s3fs pins the read to the ETag it saw (If-Match)
                etag = f.details.get("ETag")
                data = f.read()
        except FileNotFoundError:
            return None, None
    else:
        if not store.exists(uri):
            return None, None
        data = store.read_bytes(uri)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{uri} is damaged ({len(data)} bytes, {err}): restore it from a backup or prepare "
                         "into a new destination") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{uri} is damaged: not a JSON object")
    check_readable(manifest.get("schema_version"), uri)
    return Manifest(manifest, dst, store), etag


def commit_manifest(dst: str, manifest: dict, etag: str | None, storage_cfg: Store | StorageConfig | None = None) -> None:
    """Commit `manifest` (a header plus the full `shards` list) as the catalogue: the shard index is
    written under a new name, then DST/manifest.json is replaced atomically (on S3 only if it is still
    the version read: etag). An index the old header named is removed after the commit."""
    store = Store.of(storage_cfg)
    uri = storage.join(dst, MANIFEST)
    shards = list(manifest["shards"])
    old_index = (manifest.get("index") or {}).get("path")
    digest = shards_sha256(shards)
    index = {"format": INDEX_FORMAT, "path": f"{INDEX_DIR}/shards-{digest[:16]}.parquet", "num_shards": len(shards),
             "num_row_groups": sum(len(s["row_groups"]) for s in shards)}
    store.write_bytes(storage.join(dst, index["path"]), _index_bytes(shards))
    header = {k: v for k, v in dict.items(manifest) if k not in ("shards", "index", "catalogue_sha256")}
    header.update(index=index, catalogue_sha256=digest)
    data = json.dumps(header, indent=2, sort_keys=True).encode("utf-8")
    if storage.is_remote(uri):
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            store.s3fs().pipe_file(_s3_path(uri), data, **condition)
        except OSError as err:
            if _precondition_failed(err):
                raise PrepareError(f"{uri} changed while this prepare ran (another writer took the lock over?): "
                                   "nothing of this run was committed; run it again") from None
            raise
    elif storage.protocol(uri) == "file":
        _replace_local(uri[len("file://"):] if uri.startswith("file://") else uri, data)
    else:
        store.write_bytes(uri, data)
    manifest["index"], manifest["catalogue_sha256"] = index, digest
    if old_index and old_index != index["path"]:
        try:
            store.delete_file(storage.join(dst, old_index))
        except Exception:  # noqa: BLE001 - an orphan index is harmless: no header names it
            pass


def migrate(dst: str, storage_cfg: Store | StorageConfig | None = None) -> bool:
    """Rewrite a catalogue of the old layout (the full shard list in manifest.json) as header +
    index, under the writer lock. Returns False when it has the new layout already."""
    store = Store.of(storage_cfg)
    with WriterLock(dst, store):
        manifest, etag = read_manifest(dst, store)
        if manifest is None:
            raise FileNotFoundError(f"no manifest.json under {dst}")
        if "index" in dict.keys(manifest):
            return False
        commit_manifest(dst, manifest, etag, store)
        return True


def shards_sha256(shards: list[dict]) -> str:
    """The catalogue's identity (what a data position refers to): its shards' paths, rows, row
    groups and content hashes, in order. The same formula for old and new layouts."""
    rows = [[s["path"], int(s["num_rows"]), [int(n) for n in s["row_groups"]], s.get("sha256")] for s in shards]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """The header's identity hash; an old manifest's (or a plain dict's with its own shard list) is
    computed from the shards with the same formula."""
    if isinstance(manifest, Manifest) and dict.get(manifest, "catalogue_sha256"):
        return manifest["catalogue_sha256"]
    return shards_sha256(manifest["shards"])


# --------------------------------------------------------------------------------------------
# the shard index


def _index_bytes(shards: list[dict]) -> bytes:
    extra = [{k: v for k, v in s.items() if k not in _INDEX_KEYS} for s in shards]
    table = pa.table({
        "path": pa.array([s["path"] for s in shards], pa.string()),
        "num_rows": pa.array([int(s["num_rows"]) for s in shards], pa.int64()),
        "row_groups": pa.array([[int(n) for n in s["row_groups"]] for s in shards], pa.list_(pa.int32())),
        "sha256": pa.array([s.get("sha256") for s in shards], pa.string()),
        "extra": pa.array([json.dumps(e, sort_keys=True) if e else None for e in extra], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=INDEX_ROW_GROUP)  # read piece by piece
    return buf.getvalue()


def read_index(dst: str | None, index: dict, storage_cfg: Store | StorageConfig | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """The shard index a header names (some columns of it)."""
    pieces = list(_index_pieces(dst, index, Store.of(storage_cfg), columns))
    table = pa.concat_tables(pieces) if pieces else pa.table({})
    if table.num_rows != int(index.get("num_shards", table.num_rows)):
        raise ValueError(f"{storage.join(dst or '', index['path'])} is damaged: {table.num_rows} shards, the manifest "
                         f"says {index.get('num_shards')}")
    return table


def _index_pieces(dst: str | None, index: dict, store: Store, columns: list[str] | None):
    """The index's row groups one at a time (a reader keeps one decoded piece, not the whole table)."""
    if dst is None:
        raise ValueError("this manifest was not read from a catalogue: its shard index cannot be found")
    if int(index.get("format", 0)) > INDEX_FORMAT:
        raise ValueError(f"{dst}: shard index format {index.get('format')} is newer than this gammaray reads "
                         f"({INDEX_FORMAT}); upgrade gammaray")
    uri = storage.join(dst, index["path"])
    try:
        data = store.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: the shard index named by {storage.join(dst, MANIFEST)} is missing; "
                                "restore it from a backup or prepare into a new destination") from None
    pf = pq.ParquetFile(io.BytesIO(data))
    for g in range(pf.num_row_groups):
        yield pf.read_row_group(g, columns=columns, use_threads=False)


def _shard_dict(row: dict) -> dict:
    extra = row.pop("extra", None)
    out = {k: v for k, v in row.items() if not (k == "sha256" and v is None)}
    if extra:
        out.update(json.loads(extra))
    return out


def unit_table(manifest: dict):
    """Every row group of the catalogue as a `plan.UnitTable` (numpy columns)."""
    from .plan import UnitTable

    if "index" in manifest and "shards" not in dict.keys(manifest) and isinstance(manifest, Manifest):
        paths: list[str] = []
        counts, sizes = [], []
        for piece in _index_pieces(manifest.uri, manifest["index"], manifest.store, ["path", "row_groups"]):
            groups = piece.column("row_groups").combine_chunks()
            counts.append(np.diff(groups.offsets.to_numpy()))
            sizes.append(groups.flatten().to_numpy())
            paths += piece.column("path").to_pylist()
        if len(paths) != int(manifest["index"].get("num_shards", len(paths))):
            raise ValueError(f"{storage.join(manifest.uri, manifest['index']['path'])} is damaged: {len(paths)} shards, "
                             f"the manifest says {manifest['index'].get('num_shards')}")
        return UnitTable.from_flat(paths, np.concatenate(counts) if counts else np.zeros(0, np.int64),
                                   np.concatenate(sizes) if sizes else np.zeros(0, np.int64))
    shards = manifest["shards"]
    return UnitTable.from_row_groups([s["path"] for s in shards], [s["row_groups"] for s in shards])


def _replace_local(path: str, data: bytes) -> None:
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# one writer at a time


def _owner() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = str(os.getuid())
    now = time.time()
    return {"owner": f"{user}@{socket.gethostname()}", "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": now, "heartbeat_at": now, "command": " ".join(sys.argv)[:300]}


def _describe(info: dict | None, now: float) -> str:
    if not info:
        return "owner unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started_at", 0))))
    beat = now - float(info.get("heartbeat_at", info.get("started_at", 0)))
    return f"{info.get('owner')} pid {info.get('pid')}, started {started}, last heartbeat {beat:.0f} s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(info: dict | None, now: float, stale_after_s: float = STALE_AFTER_S) -> bool:
    """The S3 lock rule: its process on this host is gone, or no heartbeat for stale_after_s."""
    if not info:
        return True
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        return True
    return now - float(info.get("heartbeat_at", 0)) > stale_after_s


class WriterLock:
    """`with WriterLock(dst): ...` holds DST/prepare.lock, or raises CatalogueBusy naming the owner."""

    def __init__(self, dst: str, storage_cfg: Store | StorageConfig | None = None, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.dst = dst
        self.uri = storage.join(dst, LOCK)
        self.store = Store.of(storage_cfg)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.took_over: dict | None = None  # the stale lock this writer replaced, if any
        self._fd: int | None = None
        self._info = _owner()
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if storage.is_remote(self.uri):
            self._acquire_s3()
        elif storage.protocol(self.uri) == "file":
            self._acquire_local()

    def check(self) -> None:
        """Raise if the lock was taken over (S3: a heartbeat found someone else's lock object)."""
        if self._lost:
            raise PrepareError(f"{self.uri}: {self._lost}; nothing of this run was committed")

    def release(self) -> None:
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
        if self._fd is not None:
            try:
                os.unlink(self._local_path())
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._etag is not None:
            fs = self.store.s3fs()
            bucket, key = _s3_path(self.uri).split("/", 1)
            try:  # only our own lock object: a conditional delete
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception as err:  # noqa: BLE001
                if not _precondition_failed(err):  # a server without conditional deletes: a plain one
                    try:
                        fs.rm_file(_s3_path(self.uri))
                    except Exception:  # noqa: BLE001 - it will go stale
                        pass
            self._etag = None

    # local: flock -------------------------------------------------------------------------

    def _local_path(self) -> str:
        return os.path.abspath(self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri)

    def _acquire_local(self) -> None:
        import fcntl

        path = self._local_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_json_fd(fd)
                os.close(fd)
                raise CatalogueBusy(f"{self.dst} is being written by another prepare ({_describe(info, time.time())}); "
                                    "wait for it to finish (a local lock is released when its process ends)") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and flock: try again
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._info).encode(), 0)
        self._fd = fd

    # S3: a lock object with a heartbeat ---------------------------------------------------

    def _acquire_s3(self) -> None:
        fs = self.store.s3fs()
        path = _s3_path(self.uri)
        body = json.dumps(self._info).encode()
        try:
            out = fs.pipe_file(path, body, IfNoneMatch="*")
        except OSError as err:
            if not _precondition_failed(err):
                raise
            out = self._take_over_stale(fs, path, body)
        self._etag = _etag_of(out, fs, path)
        self._beat = threading.Thread(target=self._heartbeat, name="prepare-lock-heartbeat", daemon=True)
        self._beat.start()

    def _take_over_stale(self, fs, path: str, body: bytes):
        try:
            with fs.open(path, "rb") as f:
                etag = f.details.get("ETag")
                raw = f.read()
        except FileNotFoundError:  # released between our PUT and this read: try once more
            return fs.pipe_file(path, body, IfNoneMatch="*")
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            info = None
        now = time.time()
        if not is_stale(info, now, self.stale_after_s):
            raise CatalogueBusy(f"{self.dst} is being written by another prepare ({_describe(info, now)}); wait for "
                                f"it to finish. If that process is gone, its lock {self.uri} goes stale "
                                f"{self.stale_after_s:.0f} s after its last heartbeat (at once if it ran on this host)")
        try:
            out = fs.pipe_file(path, body, IfMatch=etag)
        except OSError as err:
            if _precondition_failed(err):
                raise CatalogueBusy(f"{self.dst}: another prepare took over the stale lock first") from None
            raise
        self.took_over = info or {}
        return out

    def _heartbeat(self) -> None:
        fs = self.store.s3fs()
        path = _s3_path(self.uri)
        while not self._stop.wait(self.heartbeat_s):
            self._info["heartbeat_at"] = time.time()
            try:
                out = fs.pipe_file(path, json.dumps(self._info).encode(), IfMatch=self._etag)
                self._etag = _etag_of(out, fs, path)
            except OSError as err:
                if _precondition_failed(err) or isinstance(err, FileNotFoundError):
                    self._lost = "the lock was taken over by another prepare (no heartbeat got through in time)"
                    self._etag = None
                    return
            except Exception:  # noqa: BLE001 - a failed beat is retried at the next one
                pass


def _read_json_fd(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------
# s3fs for conditional requests (pyarrow's S3 filesystem has no If-Match / If-None-Match)


def _s3_path(uri: str) -> str:
    return uri[len("s3://"):]


def _precondition_failed(err: BaseException) -> bool:
    text = str(err).lower()
    return "precondition" in text or "pre-condition" in text or "412" in text


def _etag_of(put_response: Any, fs, path: str) -> str:
    if isinstance(put_response, dict) and put_response.get("ETag"):
        return put_response["ETag"]
    return fs.info(path, refresh=True)["ETag"]

