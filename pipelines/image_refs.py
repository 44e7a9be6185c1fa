"""The bytes of the image a raw record names: inline bytes, a path relative to its source file, or a URI.

What may be read (issue 13):
- **Confinement.** A local path (relative, absolute or file://) must resolve, after `..` and symlinks,
  inside the source root: the folder given to `prepare`, or the source file's folder. Anything else
  is `image_path_outside_source`, unless `allow_outside_paths`. A source that is not local (s3://,
  https://, ...) has no local root, so it can name no local file at all. Object-store and http(s)
  URIs are not confined.
- **Only regular files**, never a pseudo filesystem (/proc, /sys, /dev): a directory, a device, a
  FIFO, or a path with a NUL byte or longer than the OS allows is `image_path_invalid`.
- **A size cap before reading**: a file larger than `max_bytes` (from its size, before a byte is
  read) is `image_too_large`, and no read goes past `max_bytes + 1` bytes (a source that lies about
  its size, or has none).

Per-record faults raise `Invalid(reason, detail)`. A fault of the storage itself (the object store
not answering, a local I/O error) is not the record's: it raises `StorageFault`, which stops the
prepare before anything is committed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.fs as pafs

from gammaray.config import StorageConfig
from gammaray.schema import Invalid, Reason

from . import storage
from .storage import Store
from .catalogue import PrepareError

PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")
HTTP_TIMEOUT_S = 60.0  # a host that never answers costs one record a minute, not the run


class StorageFault(PrepareError):
    """The storage an image lives on failed (not the record): the prepare stops."""


@dataclass(frozen=True)
class ImagePolicy:
    root: str | None          # real path of the local source root; None: the source is not local
    max_bytes: int
    allow_outside: bool = False


def source_root(src: str, is_dir: bool) -> str | None:
    """The folder local image paths must stay in: SRC itself (a folder) or SRC's folder (a file)."""
    if storage.protocol(src) != "file":
        return None
    path = os.path.abspath(src[len("file://"):] if src.startswith("file://") else src)
    return os.path.realpath(path if is_dir else os.path.dirname(path))


def load_image(value: Any, source_uri: str, policy: ImagePolicy, storage_cfg: Store | StorageConfig | None) -> bytes:
    if isinstance(value, dict) and "bytes" in value:  # HF datasets / parquet struct style
        value = value["bytes"] or b""
    if isinstance(value, (bytes, bytearray)):
        if len(value) > policy.max_bytes:
            raise Invalid(Reason.IMAGE_TOO_LARGE, f"inline image of {len(value)} bytes > limit {policy.max_bytes}")
        return bytes(value)
    if not isinstance(value, str):
        raise Invalid(Reason.WRONG_TYPE, f"field 'image' must be bytes or a path/URI, got {type(value).__name__}")
    ref = value.strip()
    if not ref:
        raise Invalid(Reason.MISSING_FIELD, "field 'image' is an empty path")
    if "\0" in ref:
        raise Invalid(Reason.IMAGE_PATH_INVALID, f"image path {ref[:200]!r} contains a NUL byte")
    uri = ref if storage.is_absolute(ref) else storage.join(storage.parent(source_uri), ref)
    proto = storage.protocol(uri)
    if proto == "file":
        return _read_local(uri[len("file://"):] if uri.startswith("file://") else uri, policy)
    store = Store.of(storage_cfg)
    if proto == "s3":
        return _read_s3(uri, policy, store)
    return _read_fsspec(uri, proto, policy, store)


# --------------------------------------------------------------------------------------------
# local files


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _read_local(path: str, policy: ImagePolicy) -> bytes:
    real = os.path.realpath(path)
    if not policy.allow_outside and (policy.root is None or not _inside(real, policy.root)):
        where = f"outside the source folder {policy.root}" if policy.root else "a local file named by a non-local source"
        raise Invalid(Reason.IMAGE_OUTSIDE_SOURCE, f"{path[:300]} resolves to {real[:300]}, {where} "
                                                   "(prepare --allow-outside-paths reads it)")
    if any(_inside(real, p) for p in PSEUDO_FILESYSTEMS):
        raise Invalid(Reason.IMAGE_PATH_INVALID, f"{real[:300]} is on a pseudo filesystem, not an image file")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: `real` has no symlink left
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Invalid(Reason.IMAGE_NOT_FOUND, path[:500]) from None
    except OSError as err:
        raise _local_error(err, path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise Invalid(Reason.IMAGE_PATH_INVALID, f"{path[:500]} is {kind}")
        if st.st_size > policy.max_bytes:
            raise Invalid(Reason.IMAGE_TOO_LARGE, f"{path[:300]}: {st.st_size} bytes > limit {policy.max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(min(st.st_size, policy.max_bytes) + 1)  # not a max_bytes buffer per small image
    except OSError as err:
        raise _local_error(err, path) from None
    finally:
        os.close(fd)
    if len(data) > policy.max_bytes:
        raise Invalid(Reason.IMAGE_TOO_LARGE, f"{path[:300]}: more than {policy.max_bytes} bytes")
    return data


# errors of the disk or the network filesystem under a local path, not of the path: they stop the run
_STORAGE_ERRNOS = {getattr(errno, n) for n in ("EIO", "ESTALE", "ETIMEDOUT", "ENETDOWN", "ENETUNREACH", "EHOSTDOWN",
                                                "EHOSTUNREACH", "ECONNRESET", "ENOLINK", "EREMOTEIO", "ENOMEM")
                   if hasattr(errno, n)}


def _local_error(err: OSError, path: str) -> Exception:
    if err.errno in _STORAGE_ERRNOS:
        return StorageFault(f"local I/O error reading image {path[:300]}: {err}")
    if err.errno in (errno.EACCES, errno.EPERM):
        return Invalid(Reason.IMAGE_UNREACHABLE, f"{path[:300]}: {err.strerror}")
    return Invalid(Reason.IMAGE_PATH_INVALID, f"{path[:300]}: {err.strerror or err}")  # too long, not a dir, a socket, ...


# --------------------------------------------------------------------------------------------
# object storage and other fsspec filesystems

_DENIED = ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden", "403",
           "allaccessdisabled", "accountproblem", "invalidobjectstate")
_BAD_KEY = ("keytoolong", "key too long", "invalid_argument", "invalidargument", "invalid uri", "invalidbucketname")


def _read_s3(uri: str, policy: ImagePolicy, store: Store) -> bytes:
    """S3 answers for the record (missing key, access denied, bad key) or fails as a whole."""
    fs, path = store.resolve(uri)

    def read() -> bytes:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(uri)
        if info.type == pafs.FileType.Directory:
            raise Invalid(Reason.IMAGE_PATH_INVALID, f"{uri[:500]} is a folder (a key prefix), not an object")
        if info.size is not None and info.size > policy.max_bytes:
            raise Invalid(Reason.IMAGE_TOO_LARGE, f"{uri[:300]}: {info.size} bytes > limit {policy.max_bytes}")
        want = policy.max_bytes if info.size is None else min(info.size, policy.max_bytes)
        with fs.open_input_stream(path) as f:
            return f.read(want + 1)  # a read(n) allocates n bytes first: not max_bytes per small image

    data = _classified(read, uri, store, remote_host=False)
    if len(data) > policy.max_bytes:
        raise Invalid(Reason.IMAGE_TOO_LARGE, f"{uri[:300]}: more than {policy.max_bytes} bytes")
    return data


def _read_fsspec(uri: str, proto: str, policy: ImagePolicy, store: Store) -> bytes:
    import fsspec

    web = proto in ("http", "https")
    kwargs: dict[str, Any] = {}
    if web:
        import aiohttp

        kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S, sock_connect=10)}
    fs, path = fsspec.core.url_to_fs(uri, **kwargs)

    def read() -> bytes:
        info = fs.info(path)
        if info.get("type") == "directory":
            raise Invalid(Reason.IMAGE_PATH_INVALID, f"{uri[:500]} is a folder, not a file")
        size = info.get("size")
        if size is not None and size > policy.max_bytes:
            raise Invalid(Reason.IMAGE_TOO_LARGE, f"{uri[:300]}: {size} bytes > limit {policy.max_bytes}")
        out = bytearray()
        with fs.open(path, "rb") as f:
            while len(out) <= policy.max_bytes:
                chunk = f.read(policy.max_bytes + 1 - len(out))
                if not chunk:
                    break
                out += chunk
        return bytes(out)

    data = _classified(read, uri, store, remote_host=web)
    if len(data) > policy.max_bytes:
        raise Invalid(Reason.IMAGE_TOO_LARGE, f"{uri[:300]}: more than {policy.max_bytes} bytes")
    return data


def _classified(read: Callable[[], bytes], uri: str, store: Store, remote_host: bool) -> bytes:
    """Run `read` with the storage retries; turn what the server said about this object into a reason.

    remote_host: the URI names a web host of its own (http/https): that host not answering is the
    record's problem (a dead link), not an outage of the catalogue's storage."""
    try:
        return storage.with_retries(read, retries=store.settings.retries, what=uri)
    except Invalid:
        raise
    except Exception as err:  # noqa: BLE001 - classified below; anything unknown stops the run
        chain = _chain(err)
        status = next((getattr(e, "status", None) for e in chain if isinstance(getattr(e, "status", None), int)), None)
        text = " ".join(str(e) for e in chain).lower()
        if status in (404, 410) or (status is None and not _is_connection_error(chain) and storage.is_not_found(err)):
            raise Invalid(Reason.IMAGE_NOT_FOUND, uri[:500]) from None
        if status in (401, 403) or any(s in text for s in _DENIED):
            raise Invalid(Reason.IMAGE_UNREACHABLE, f"{uri[:300]}: access denied: {_short(err)}") from None
        if any(s in text for s in _BAD_KEY):
            raise Invalid(Reason.IMAGE_PATH_INVALID, f"{uri[:300]}: {_short(err)}") from None
        if remote_host:
            raise Invalid(Reason.IMAGE_UNREACHABLE, f"{uri[:300]}: {_short(err)}") from None
        raise StorageFault(f"storage error reading image {uri[:300]}: {_short(err)}") from err


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_connection_error(chain: list[BaseException]) -> bool:
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "TimeoutError", "ClientConnectionError", "ServerTimeoutError", "gaierror"})


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]
