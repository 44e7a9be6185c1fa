"""Where bytes live: local paths, file:// and s3:// URIs through pyarrow (and s3fs), any other
fsspec URL (memory://, http(s)://, gs://, ... whatever fsspec has a driver for) through fsspec.

Endpoint and credentials come from `StorageConfig` (names of environment variables) or the standard
AWS environment variables. Transient errors are retried with exponential backoff.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import pyarrow.fs as pafs

from gammaray.config import StorageConfig

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
    retries: int

    def __repr__(self) -> str:  # never print credentials, only where they come from
        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_env={self.access_key_env!r}, secret_key_env={self.secret_key_env!r})"
        )

    @classmethod
    def from_config(cls, cfg: StorageConfig | None) -> "S3Settings":
        cfg = cfg or StorageConfig()
        return cls(
            endpoint_url=cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
            access_key_env=cfg.access_key_env,
            secret_key_env=cfg.secret_key_env,
            retries=cfg.retries,
        )

    def _credentials(self) -> tuple[str | None, str | None]:
        return os.environ.get(self.access_key_env), os.environ.get(self.secret_key_env)

    def pyarrow_fs(self) -> pafs.S3FileSystem:
        key, secret = self._credentials()
        kwargs: dict[str, Any] = dict(
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, self.retries + 1)),
            connect_timeout=10,
            request_timeout=60,
        )
        if self.endpoint_url:
            kwargs["endpoint_override"] = self.endpoint_url
            kwargs["scheme"] = "https" if self.endpoint_url.startswith("https") else "http"
        kwargs["region"] = self.region or "us-east-1"
        standard = (self.access_key_env, self.secret_key_env) == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        if key and secret and not standard:
            # explicit keys end up in the pickled filesystem; the standard variables are read by
            # the AWS credential chain in each process instead, so nothing secret travels
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
            config_kwargs={"retries": {"max_attempts": max(1, self.retries + 1), "mode": "standard"}},
            skip_instance_cache=True,
        )


@functools.lru_cache(maxsize=16)
def _cached_pyarrow_fs(settings: S3Settings) -> pafs.S3FileSystem:
    return settings.pyarrow_fs()


def resolve(uri: str, storage: StorageConfig | S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a URI."""
    if is_remote(uri):
        settings = storage if isinstance(storage, S3Settings) else S3Settings.from_config(storage)
        return _cached_pyarrow_fs(settings), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))


def fsspec_for(uri: str, storage: StorageConfig | S3Settings | None = None):
    """(fsspec filesystem, path) for a URI."""
    if is_remote(uri):
        settings = storage if isinstance(storage, S3Settings) else S3Settings.from_config(storage)
        return settings.fsspec_fs(), uri[len("s3://"):].rstrip("/")
    import fsspec

    return fsspec.filesystem("file"), os.path.abspath(_local_path(uri))


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def with_retries(fn: Callable[[], T], retries: int = 5, base_delay: float = 0.2, what: str = "") -> T:
    """Call fn, retrying transient failures (network, throttling) with jittered exponential backoff."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classify below
            transient = isinstance(err, TRANSIENT_ERRORS) or _looks_transient(err)
            if not transient or attempt >= retries:
                raise
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            attempt += 1
            time.sleep(delay)


def _looks_transient(err: BaseException) -> bool:
    text = str(err).lower()
    return any(
        s in text
        for s in ("slowdown", "throttl", "timed out", "timeout", "connection reset", "503", "internalerror",
                  "network_connection", "temporarily")
    )


def is_not_found(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    text = str(err).lower()
    return isinstance(err, OSError) and any(s in text for s in ("not found", "no such", "does not exist", "nosuchkey", "404"))


def read_bytes(uri: str, storage: StorageConfig | S3Settings | None = None) -> bytes:
    retries = _retries(storage)
    if is_fsspec_only(uri):
        fs, path = _fsspec_generic(uri)
        return with_retries(lambda: fs.cat_file(path), retries=retries, what=uri)
    fs, path = resolve(uri, storage)

    def _read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return with_retries(_read, retries=retries, what=uri)


def open_input(uri: str, storage: StorageConfig | S3Settings | None = None):
    """A sequential binary file object (streaming: a tar shard need not fit in memory)."""
    if is_fsspec_only(uri):
        fs, path = _fsspec_generic(uri)
        return with_retries(lambda: fs.open(path, "rb"), retries=_retries(storage), what=uri)
    fs, path = resolve(uri, storage)
    return with_retries(lambda: fs.open_input_stream(path), retries=_retries(storage), what=uri)


def open_random_access(uri: str, storage: StorageConfig | S3Settings | None = None):
    """A seekable binary file object (Parquet footers)."""
    if is_fsspec_only(uri):
        fs, path = _fsspec_generic(uri)
        return with_retries(lambda: fs.open(path, "rb"), retries=_retries(storage), what=uri)
    fs, path = resolve(uri, storage)
    return with_retries(lambda: fs.open_input_file(path), retries=_retries(storage), what=uri)


def _retries(storage: StorageConfig | S3Settings | None) -> int:
    return storage.retries if storage is not None else 5


def write_bytes(uri: str, data: bytes, storage: StorageConfig | S3Settings | None = None) -> None:
    if is_fsspec_only(uri):
        gfs, gpath = _fsspec_generic(uri)
        with_retries(lambda: gfs.pipe_file(gpath, data), retries=_retries(storage), what=uri)
        return
    fs, path = resolve(uri, storage)
    folder = path.rsplit("/", 1)[0]
    if not is_remote(uri):
        os.makedirs(folder, exist_ok=True)

    def _write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    with_retries(_write, what=uri)


def read_json(uri: str, storage: StorageConfig | S3Settings | None = None) -> Any:
    return json.loads(read_bytes(uri, storage).decode("utf-8"))


def write_json(uri: str, obj: Any, storage: StorageConfig | S3Settings | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"), storage)


def exists(uri: str, storage: StorageConfig | S3Settings | None = None) -> bool:
    if is_fsspec_only(uri):
        fs, path = _fsspec_generic(uri)
        return fs.exists(path)
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, storage: StorageConfig | S3Settings | None = None) -> bool:
    if is_fsspec_only(uri):
        fs, path = _fsspec_generic(uri)
        return fs.isdir(path)
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, suffix: str | tuple[str, ...] = "", storage: StorageConfig | S3Settings | None = None) -> list[str]:
    """Sorted URIs of files under uri (recursive) ending with suffix."""
    if is_fsspec_only(uri):
        fs, path = _fsspec_generic(uri)
        return sorted(fs.unstrip_protocol(p) for p in fs.find(path) if p.endswith(suffix))
    fs, path = resolve(uri, storage)
    info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = "s3://" if is_remote(uri) else ""
    return sorted(prefix + i.path for i in info if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete_dir(uri: str, storage: StorageConfig | S3Settings | None = None) -> None:
    fs, path = resolve(uri, storage)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def download_dir(uri: str, local_dir: str, storage: StorageConfig | S3Settings | None = None) -> str:
    """Copy a small directory (a tokenizer, an exported model) to local disk; returns local_dir."""
    if not is_remote(uri):
        return os.path.abspath(_local_path(uri))
    fs, path = resolve(uri, storage)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def upload_dir(local_dir: str, uri: str, storage: StorageConfig | S3Settings | None = None) -> None:
    fs, path = resolve(uri, storage)
    if not is_remote(uri):
        os.makedirs(path, exist_ok=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def buffer(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
