"""Where bytes live: local paths, file:// and s3:// URIs through pyarrow (and s3fs), any other
fsspec URL (memory://, http(s)://, gs://, ... whatever fsspec has a driver for) through fsspec.

Endpoint and credentials come from `StorageConfig` (names of environment variables) or the standard
AWS environment variables, read in whichever process touches the storage: the s3:// filesystem that
`resolve` returns (and that Ray Train and Ray Tune are given) pickles as those names, never as keys.

`Store` is the storage bound once: `Store.of(cfg.storage)` is made where a command starts (one per
process and settings) and handed down; the code below calls its methods (`store.read_json(uri)`,
`store.resolve(uri)`, `store.retry(fn, what)`). It pickles as its `S3Settings` alone, so a Ray task,
actor or Train worker that receives it builds its own filesystems, with its own environment's keys.
The module functions (`read_bytes(uri, storage)`, ...) remain for callers holding settings.

Transient errors (connection refused or reset, timeouts, throttling, 5xx) are retried with jittered
exponential backoff for `storage.retry_time_s`; past that, `StorageUnavailable` names the endpoint
and the operation in one line.

Length (about 700 lines): every storage access goes through this one module, so retries and
credential handling cannot differ between readers, writers, Ray Train and Ray Tune.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from gammaray.config import RunError, StorageConfig

log = logging.getLogger("gammaray.storage")

T = TypeVar("T")


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def protocol(uri: str) -> str:
    """'s3', 'file' (also for plain paths) or another fsspec protocol ('memory', 'https', ...)."""
    if uri.startswith("s3://"):
        return "s3"
    if "://" not in uri or uri.startswith("file://"):
        return "file"
    return uri.split("://", 1)[0]


def is_fsspec_only(uri: str) -> bool:
    return protocol(uri) not in ("s3", "file")


def _fsspec_generic(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def parent(uri: str) -> str:
    """The folder holding uri (same scheme)."""
    u = uri.rstrip("/")
    return u.rsplit("/", 1)[0] if "/" in u.split("://", 1)[-1] else (u.split("://", 1)[0] + "://" if "://" in u else ".")


def is_absolute(ref: str) -> bool:
    return "://" in ref or os.path.isabs(ref)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 settings: what a process needs to build clients (no secret in repr)."""

    endpoint_url: str | None
    region: str | None
    access_key_env: str
    secret_key_env: str
    retry_time_s: float
    retries: int = 5

    def __repr__(self) -> str:  # never print credentials, only where they come from
        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_env={self.access_key_env!r}, secret_key_env={self.secret_key_env!r}, "
            f"retry_time_s={self.retry_time_s!r})"
        )

    @classmethod
    def from_config(cls, cfg: StorageConfig | None) -> "S3Settings":
        cfg = cfg or StorageConfig()
        return cls(
            endpoint_url=cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
            access_key_env=cfg.access_key_env,
            secret_key_env=cfg.secret_key_env,
            retry_time_s=cfg.retry_time_s,
            retries=cfg.retries,
        )

    def _credentials(self) -> tuple[str | None, str | None]:
        return os.environ.get(self.access_key_env), os.environ.get(self.secret_key_env)

    @property
    def sdk_attempts(self) -> int:
        """Attempts inside one client call (the SDK's own quick retries); the long wait for an
        outage to end is `with_retries`'s."""
        return 3 if self.retry_time_s > 0 else 1

    def pyarrow_fs(self) -> pafs.S3FileSystem:
        """The native filesystem, with the keys of this process's environment: for this process
        only (it would pickle them); `resolve` hands out `RetryingS3` instead."""
        key, secret = self._credentials()
        kwargs: dict[str, Any] = dict(
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.sdk_attempts),
            connect_timeout=10,
            request_timeout=60,
            # uploads in the writing thread: `copy_files(use_threads=True)` (Ray's checkpoint upload)
            # runs each file on Arrow's CPU pool, and an output stream that waits there for its own
            # background parts deadlocks once every pool thread does (apache/arrow#32372)
            background_writes=False,
        )
        if self.endpoint_url:
            kwargs["endpoint_override"] = self.endpoint_url
            kwargs["scheme"] = "https" if self.endpoint_url.startswith("https") else "http"
        kwargs["region"] = self.region or "us-east-1"
        standard = (self.access_key_env, self.secret_key_env) == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        if key and secret and not standard:
            # (the standard variables are read by the AWS credential chain itself)
            kwargs["access_key"] = key
            kwargs["secret_key"] = secret
        return pafs.S3FileSystem(**kwargs)

    def fsspec_fs(self):
        import s3fs

        key, secret = self._credentials()
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        # region_name is deliberately not passed: several S3-compatible servers then refuse
        # bucket creation (InvalidLocationConstraint).
        return s3fs.S3FileSystem(
            key=key,
            secret=secret,
            client_kwargs=client_kwargs,
            config_kwargs={"retries": {"max_attempts": self.sdk_attempts, "mode": "standard"}},
            skip_instance_cache=True,
        )


@functools.lru_cache(maxsize=16)
def _native_s3(settings: S3Settings) -> pafs.S3FileSystem:
    return settings.pyarrow_fs()


def settings_of(storage: Store | StorageConfig | S3Settings | None) -> S3Settings:
    if isinstance(storage, Store):
        return storage.settings
    return storage if isinstance(storage, S3Settings) else S3Settings.from_config(storage)


def resolve(uri: str, storage: Store | StorageConfig | S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    return Store.of(storage).resolve(uri)


def fsspec_for(uri: str, storage: Store | StorageConfig | S3Settings | None = None):
    return Store.of(storage).fsspec(uri)


# --------------------------------------------------------------------------------------------
# transient faults: retried for storage.retry_time_s, then one short error


class StorageUnavailable(OSError, RunError):
    """Storage kept failing with transient errors for longer than storage.retry_time_s."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
# how pyarrow (AWS SDK), botocore/s3fs and urllib3 word an outage, a throttle or a 5xx
_TRANSIENT_TEXT = (
    "network_connection", "could not connect", "couldn't connect", "failed to connect", "connection refused",
    "connection reset", "connection aborted", "connection was closed", "broken pipe", "timed out", "timeout",
    "slowdown", "slow_down", "throttl", "service_unavailable", "serviceunavailable", "service unavailable",
    "internal_failure", "internalerror", "internal error", "request_timeout", "temporarily", "endpoint url",
    "(500)", "(502)", "(503)", "(504)",
)
_DEFAULT_RETRY_TIME_S = StorageConfig().retry_time_s
_MAX_DELAY_S = 10.0
_last_warning = 0.0


def is_transient(err: BaseException) -> bool:
    if isinstance(err, StorageUnavailable) or is_not_found(err):
        return False
    if isinstance(err, TRANSIENT_ERRORS):
        return True
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError"}:
        return True
    text = str(err).lower()
    return any(s in text for s in _TRANSIENT_TEXT)


def endpoint_of(storage: Store | StorageConfig | S3Settings | None) -> str:
    return settings_of(storage).endpoint_url or "the default AWS S3 endpoint"


def with_retries(fn: Callable[[], T], what: str = "", storage: Store | StorageConfig | S3Settings | None = None,
                 retries: int | None = None) -> T:
    """Call fn; retry transient failures with jittered exponential backoff (0.5 s doubling, at most
    10 s apart) until storage.retry_time_s have passed since the first one, then raise
    StorageUnavailable naming the endpoint and `what` ("reading s3://b/k"). Other errors (not found,
    access denied, damaged data) are raised at once.

    `retries=N` instead: N retries, then the last error as it is. For a host that is not the run's
    storage (storage.retries for an http(s) image URL): a dead link is the record's fault, no outage
    to wait out."""
    global _last_warning
    budget = settings_of(storage).retry_time_s if storage is not None else _DEFAULT_RETRY_TIME_S
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            result = fn()
            if first_failure is not None:
                log.warning("storage: %s succeeded after %.0f s of transient errors", what, time.monotonic() - first_failure)
            return result
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_transient(err):
                raise
            if retries is not None:
                if attempt >= retries:
                    raise
                time.sleep(min(_MAX_DELAY_S, 0.2 * 2**attempt) * (0.5 + random.random()))
                attempt += 1
                continue
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            if waited >= budget:
                cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
                where = f" at {endpoint_of(storage)}" if "s3://" in what else ""
                raise StorageUnavailable(
                    f"storage{where} kept failing for {waited:.0f} s while {what} "
                    f"(storage.retry_time_s={budget:g}): {cause}. What was written before is kept: once the storage "
                    f"answers again, re-run the same command (a training run resumes from its last recorded checkpoint)."
                ) from None
            if now - _last_warning > 10.0:  # an outage fails many operations at once: warn now and then
                _last_warning = now
                log.warning("storage: %s failed (%s); retrying for up to %.0f s", what,
                            (str(err).strip().splitlines() or [""])[0][:160], budget)
            delay = min(_MAX_DELAY_S, 0.5 * 2**attempt) * (0.5 + random.random())
            attempt += 1
            time.sleep(max(0.0, min(delay, budget - waited)))


# --------------------------------------------------------------------------------------------
# the s3:// filesystem handed to our code, Ray Data tasks, Ray Train and Ray Tune


def retrying_s3(settings: S3Settings) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(RetryingS3(settings))


class RetryingS3(pafs.FileSystemHandler):
    """A pyarrow filesystem over S3 that

    - holds no credentials: it pickles as its `S3Settings` (endpoint, region, the NAMES of the key
      variables) and builds the real S3FileSystem from the environment of the process that uses it,
      so Ray Train's RunConfig and Ray Tune's tuner.pkl carry no secret;
    - retries every call for settings.retry_time_s (`with_retries`): metadata calls as they are,
      reads by reopening the object at the offset where they broke, writes by spooling the object
      locally (memory, then an anonymous temporary file) and uploading it whole on close, so an
      upload cut by an outage is redone rather than left half-written. Ray Train's checkpoint upload
      and storage-marker check go through here."""

    SPOOL_IN_MEMORY = 16 * 2**20
    CHUNK = 8 * 2**20

    def __init__(self, settings: S3Settings):
        self.settings = settings

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingS3) and other.settings == self.settings

    def __ne__(self, other) -> bool:
        return not self == other

    def _fs(self) -> pafs.S3FileSystem:
        return _native_s3(self.settings)

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, what, self.settings)

    def get_type_name(self) -> str:
        return "gammaray-s3"

    def normalize_path(self, path: str) -> str:
        return self._fs().normalize_path(path)

    def get_file_info(self, paths):
        return self.retry(f"looking up s3://{paths[0] if paths else ''}", lambda: self._fs().get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self.retry(f"listing s3://{selector.base_dir}", lambda: self._fs().get_file_info(selector))

    def create_dir(self, path, recursive):
        self.retry(f"creating s3://{path}", lambda: self._fs().create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self.retry(f"deleting s3://{path}", lambda: self._fs().delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.retry(f"deleting s3://{path}", lambda: self._fs().delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path):
        self.retry(f"deleting s3://{path}", lambda: self._fs().delete_file(path))

    def move(self, src, dest):
        self.retry(f"moving s3://{src}", lambda: self._fs().move(src, dest))

    def copy_file(self, src, dest):
        self.retry(f"copying s3://{src}", lambda: self._fs().copy_file(src, dest))

    def open_input_stream(self, path):
        return pa.PythonFile(_RetryingReader(self, path), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_RetryingReader(self, path), mode="r")

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_SpooledUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("S3 objects cannot be appended to")


class _RetryingReader(io.RawIOBase):
    """Random-access reads of one object (positioned reads, so a retry just asks again)."""

    def __init__(self, handler: RetryingS3, path: str):
        super().__init__()
        self._h, self._path, self._pos = handler, path, 0
        self._f = handler.retry(f"opening s3://{path}", lambda: handler._fs().open_input_file(path))
        self._size = self._f.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = max(0, offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        n = self._size - self._pos if size is None or size < 0 else min(size, max(0, self._size - self._pos))
        if n <= 0:
            return b""

        def attempt() -> bytes:
            if self._f is None:  # a broken connection: open the object again
                self._f = self._h._fs().open_input_file(self._path)
            try:
                return self._f.read_at(n, self._pos)
            except Exception:
                self._f = None
                raise

        data = self._h.retry(f"reading s3://{self._path}", attempt)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()


class _SpooledUpload(io.RawIOBase):
    """Writes collect in a spool; close() uploads the whole object, retried as a unit."""

    def __init__(self, handler: RetryingS3, path: str, metadata):
        super().__init__()
        self._h, self._path, self._metadata = handler, path, metadata
        self._spool = tempfile.SpooledTemporaryFile(max_size=RetryingS3.SPOOL_IN_MEMORY)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._spool.write(b)

    def tell(self) -> int:
        return self._spool.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            def upload() -> None:
                self._spool.seek(0)
                with self._h._fs().open_output_stream(self._path, metadata=self._metadata or None) as out:
                    while chunk := self._spool.read(RetryingS3.CHUNK):
                        out.write(chunk)

            self._h.retry(f"writing s3://{self._path}", upload)
        finally:
            self._spool.close()
            super().close()


def is_not_found(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    text = str(err).lower()
    return isinstance(err, OSError) and any(s in text for s in ("not found", "no such", "does not exist", "nosuchkey", "404"))


_ACCESS_TEXT = ("access denied", "accessdenied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch",
                "nosuchbucket", "expiredtoken", "permission denied")


def is_storage_fault(err: BaseException) -> bool:
    """The storage failed, not the data: an outage (transient, or one that outlasted the retries) or
    access to the bucket refused. A run stops on these; it never quarantines records for them."""
    if isinstance(err, (StorageUnavailable, PermissionError)) or is_transient(err):
        return True
    text = str(err).lower()
    return any(s in text for s in _ACCESS_TEXT)


class Store:
    """The storage of a run, bound once: its settings, the s3:// filesystem (`RetryingS3`, made on
    first use) and every operation on URIs (local paths, file://, s3://, other fsspec URLs) with the
    retries of `with_retries`.

    There is one per process and settings: `Store(settings)` and `Store.of(cfg.storage)` return the
    same object each time. It pickles as its settings alone (no key, no open connection), and the
    process that unpickles it gets its own bound one."""

    _bound: dict[S3Settings, "Store"] = {}
    _lock = threading.Lock()
    settings: S3Settings

    def __new__(cls, settings: S3Settings) -> "Store":
        with cls._lock:
            store = cls._bound.get(settings)
            if store is None:
                store = super().__new__(cls)
                store.settings = settings
                store._s3 = None
                store._s3fs = None
                cls._bound[settings] = store
        return store

    @classmethod
    def of(cls, storage: Store | StorageConfig | S3Settings | None = None) -> "Store":
        """The bound store for storage settings (a `Store` is returned as it is)."""
        return storage if isinstance(storage, Store) else cls(settings_of(storage))

    def __reduce__(self):
        return (Store, (self.settings,))

    def __eq__(self, other) -> bool:
        return isinstance(other, Store) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash(self.settings)

    def __repr__(self) -> str:
        return f"Store({self.settings!r})"

    @property
    def endpoint(self) -> str:
        """The S3 endpoint, as error messages name it."""
        return endpoint_of(self.settings)

    def retry(self, fn: Callable[[], T], what: str = "", retries: int | None = None) -> T:
        """`with_retries` under this storage's storage.retry_time_s."""
        return with_retries(fn, what, self.settings, retries)

    def _retrying_s3(self) -> pafs.PyFileSystem:
        if self._s3 is None:
            self._s3 = retrying_s3(self.settings)
        return self._s3

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path within it) for a URI. For s3:// a `RetryingS3` filesystem: safe to
        hand to Ray (it carries no key) and it rides out outages of up to storage.retry_time_s."""
        if is_remote(uri):
            return self._retrying_s3(), uri[len("s3://"):].rstrip("/")
        return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))

    def s3fs(self):
        """This process's s3fs client of the storage, made on first use (about 0.3 s: a botocore
        session), for what pyarrow's S3 filesystem cannot do: conditional requests (If-Match,
        If-None-Match) of the catalogue's manifest and writer lock."""
        if self._s3fs is None:
            self._s3fs = self.settings.fsspec_fs()
        return self._s3fs

    def fsspec(self, uri: str):
        """(fsspec filesystem, path) for a URI (for s3://, a new s3fs client on each call)."""
        if is_remote(uri):
            return self.settings.fsspec_fs(), uri[len("s3://"):].rstrip("/")
        import fsspec

        return fsspec.filesystem("file"), os.path.abspath(_local_path(uri))

    def _local_retries(self, uri: str, fn: Callable[[], T], what: str) -> T:
        """s3:// calls go through RetryingS3, which retries each of them: no second loop around it."""
        return fn() if is_remote(uri) else self.retry(fn, what)

    def read_bytes(self, uri: str) -> bytes:
        if is_fsspec_only(uri):
            fs, path = _fsspec_generic(uri)
            return self.retry(lambda: fs.cat_file(path), f"reading {uri}")
        fs, path = self.resolve(uri)

        def _read() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        return self._local_retries(uri, _read, f"reading {uri}")

    def open_input(self, uri: str):
        """A sequential binary file object (streaming: a tar shard need not fit in memory)."""
        if is_fsspec_only(uri):
            fs, path = _fsspec_generic(uri)
            return self.retry(lambda: fs.open(path, "rb"), f"opening {uri}")
        fs, path = self.resolve(uri)
        return self._local_retries(uri, lambda: fs.open_input_stream(path), f"opening {uri}")

    def open_random_access(self, uri: str):
        """A seekable binary file object (Parquet footers)."""
        if is_fsspec_only(uri):
            fs, path = _fsspec_generic(uri)
            return self.retry(lambda: fs.open(path, "rb"), f"opening {uri}")
        fs, path = self.resolve(uri)
        return self._local_retries(uri, lambda: fs.open_input_file(path), f"opening {uri}")

    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_fsspec_only(uri):
            gfs, gpath = _fsspec_generic(uri)
            self.retry(lambda: gfs.pipe_file(gpath, data), f"writing {uri}")
            return
        fs, path = self.resolve(uri)
        folder = path.rsplit("/", 1)[0]
        if not is_remote(uri):
            os.makedirs(folder, exist_ok=True)

        def _write() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        self._local_retries(uri, _write, f"writing {uri}")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri).decode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))

    def exists(self, uri: str) -> bool:
        if is_fsspec_only(uri):
            fs, path = _fsspec_generic(uri)
            return self.retry(lambda: fs.exists(path), f"looking up {uri}")
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        if is_fsspec_only(uri):
            fs, path = _fsspec_generic(uri)
            return self.retry(lambda: fs.isdir(path), f"looking up {uri}")
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type == pafs.FileType.Directory

    def list_files(self, uri: str, suffix: str | tuple[str, ...] = "") -> list[str]:
        """Sorted URIs of files under uri (recursive) ending with suffix."""
        if is_fsspec_only(uri):
            fs, path = _fsspec_generic(uri)
            found = self.retry(lambda: fs.find(path), f"listing {uri}")
            return sorted(fs.unstrip_protocol(p) for p in found if p.endswith(suffix))
        fs, path = self.resolve(uri)
        info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        prefix = "s3://" if is_remote(uri) else ""
        return sorted(prefix + i.path for i in info if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def file_sizes(self, uri: str) -> dict[str, int]:
        """{path relative to uri: size in bytes} of every file under uri (recursive, one listing)."""
        fs, path = self.resolve(uri)
        info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return {i.path[len(path) + 1:]: i.size for i in info if i.type == pafs.FileType.File}

    def delete_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass

    def delete_file(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        fs.delete_file(path)

    def download_dir(self, uri: str, local_dir: str) -> str:
        """Copy a small directory (a tokenizer, an exported model) to local disk; returns local_dir."""
        if not is_remote(uri):
            return os.path.abspath(_local_path(uri))
        fs, path = self.resolve(uri)
        pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def upload_dir(self, local_dir: str, uri: str) -> None:
        fs, path = self.resolve(uri)
        if not is_remote(uri):
            os.makedirs(path, exist_ok=True)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


# the same operations for a caller holding settings (StorageConfig, S3Settings, None: the environment)
StorageLike = Store | StorageConfig | S3Settings | None


def read_bytes(uri: str, storage: StorageLike = None) -> bytes:
    return Store.of(storage).read_bytes(uri)


def open_input(uri: str, storage: StorageLike = None):
    return Store.of(storage).open_input(uri)


def open_random_access(uri: str, storage: StorageLike = None):
    return Store.of(storage).open_random_access(uri)


def write_bytes(uri: str, data: bytes, storage: StorageLike = None) -> None:
    Store.of(storage).write_bytes(uri, data)


def read_json(uri: str, storage: StorageLike = None) -> Any:
    return Store.of(storage).read_json(uri)


def write_json(uri: str, obj: Any, storage: StorageLike = None) -> None:
    Store.of(storage).write_json(uri, obj)


def exists(uri: str, storage: StorageLike = None) -> bool:
    return Store.of(storage).exists(uri)


def is_dir(uri: str, storage: StorageLike = None) -> bool:
    return Store.of(storage).is_dir(uri)


def list_files(uri: str, suffix: str | tuple[str, ...] = "", storage: StorageLike = None) -> list[str]:
    return Store.of(storage).list_files(uri, suffix)


def file_sizes(uri: str, storage: StorageLike = None) -> dict[str, int]:
    return Store.of(storage).file_sizes(uri)


def delete_dir(uri: str, storage: StorageLike = None) -> None:
    Store.of(storage).delete_dir(uri)


def download_dir(uri: str, local_dir: str, storage: StorageLike = None) -> str:
    return Store.of(storage).download_dir(uri, local_dir)


def upload_dir(local_dir: str, uri: str, storage: StorageLike = None) -> None:
    Store.of(storage).upload_dir(local_dir, uri)

def buffer(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
