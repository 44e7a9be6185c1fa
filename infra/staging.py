"""The staging copy of a project that a submitted job runs in (its runtime environment's `working_dir`):
git's view of the project (tracked and unignored files; a plain walk when the project is not a git
checkout), never following a symlink out of the project, refusing files that look like credentials
by name or content (infra/credentials.py) and files over a size cap, streamed a chunk at a time."""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .credentials import (CHUNK, ContentCheck, credential_name)
from .errors import SubmitError

JOB_DIR = ".gammaray_job"

# never uploaded: build outputs, environments, VCS data, runs, tests (a pattern starting with "/"
# matches a path from the project root, any other one any path component). Credential files are
# not excluded quietly: they stop the submission (infra/credentials.py).
DEFAULT_EXCLUDES = [
    ".git", ".hg", ".venv", "/venv", "/env", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".hypothesis", "*.egg-info", "/build", "/dist", "node_modules", "/runs", JOB_DIR, "/tests", "/.ci",
    "/.whl", "/.gl", ".ipynb_checkpoints",
]
# a project file over this is refused (--max-file-mb): code and configs travel with the job, data
# is read from object storage; Ray keeps every uploaded package in the cluster's object store
DEFAULT_MAX_FILE_MB = 100.0


def _excluded(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        if pat.startswith("/"):
            if fnmatch.fnmatch(rel, pat[1:]) or fnmatch.fnmatch(rel, pat[1:] + "/*"):
                return True
        elif any(fnmatch.fnmatch(part, pat) for part in parts) or fnmatch.fnmatch(rel, pat):
            return True
    return False


def _git_files(root: Path) -> list[str] | None:
    """Paths under `root` that git tracks or would track (tracked + untracked, not ignored), or None
    when `root` is not inside a git work tree (or git is not installed)."""
    import subprocess

    try:
        inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"],
                                capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if inside.returncode != 0 and "not a git repository" not in inside.stderr:
        # e.g. "detected dubious ownership": not a reason to upload what .gitignore leaves out
        raise SubmitError(f"git cannot read {root}: {inside.stderr.strip()}")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return None
    proc = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise SubmitError(f"git ls-files failed in {root}: {proc.stderr.decode(errors='replace').strip()}")
    return sorted({p for p in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if p})


def _walk_files(root: Path, excludes: list[str]) -> list[str]:
    """Every file and symlink under `root` (symlinked folders are listed, not entered)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in dirnames:
            if _excluded(rel_dir + d, excludes):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                out.append(rel_dir + d)
            else:
                keep.append(d)
        dirnames[:] = keep
        out.extend(rel_dir + f for f in filenames)
    return sorted(out)


@dataclass
class StagedProject:
    dir: str
    source: str                                                # "git ..." or "a walk of ..."
    skipped: list[str] = field(default_factory=list)           # "path (why)": left out, nothing secret known
    credentials: list[str] = field(default_factory=list)       # "path: what it holds (by name|content)"
    oversized: list[str] = field(default_factory=list)         # "path (size)": over the per-file cap


def stage_working_dir(src: Path, excludes: list[str], allow: Iterable[str] = (),
                      max_file_bytes: int | None = None) -> StagedProject:
    """Copy the project's files into a new temp dir: git's view of the project (tracked and
    unignored files) when `src` is in a git work tree, else every file under it; minus `excludes`.
    Symlinks are followed only to files inside the project; files that look like credentials (by
    name or content, unless they match `allow`) are listed in `.credentials` and not copied, files
    over `max_file_bytes` in `.oversized`. Files are streamed (checked while copied, a chunk at a
    time), never read whole."""
    root = src.resolve()
    files = _git_files(root)
    if files is None:
        files = _walk_files(root, excludes)
        source = f"a walk of {root} (not a git checkout: .gitignore is not read; the default excludes apply)"
    else:
        source = f"git's view of {root} (tracked and unignored files)"
    staged = StagedProject(tempfile.mkdtemp(prefix="gammaray-job-"), source)
    try:
        for rel in files:
            if _excluded(rel, excludes):
                continue
            _stage_one(root, rel, staged, excludes, list(allow), max_file_bytes)
    except BaseException:
        shutil.rmtree(staged.dir, ignore_errors=True)
        raise
    return staged


def _stage_one(root: Path, rel: str, staged: StagedProject, excludes: list[str], allow: list[str],
               max_file_bytes: int | None = None) -> None:
    import stat

    path = root / rel
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # in git's index, deleted from the work tree
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        staged.skipped.append(f"{rel} (a symlink to {os.readlink(path) if path.is_symlink() else real}, outside "
                              "the project: not followed)")
        return
    target = real.relative_to(root).as_posix()  # == rel unless a symlink: its target is checked as well
    if target != rel and _excluded(target, excludes):
        staged.skipped.append(f"{rel} (a symlink to {target}, which is excluded)")
        return
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            staged.skipped.append(f"{rel} (a symlink to a folder inside the project: not followed)")
            return
    if stat.S_ISDIR(st.st_mode):
        staged.skipped.append(f"{rel} (a git submodule or nested repository: not staged)")
        return
    if not stat.S_ISREG(st.st_mode):
        staged.skipped.append(f"{rel} (not a regular file)")
        return
    allowed = _excluded(rel, allow)
    what = None if allowed else credential_name(rel) or credential_name(target)
    if what:
        staged.credentials.append(f"{rel}: {what} (by its name{'' if target == rel else f', via {target}'})")
        return
    if max_file_bytes is not None and st.st_size > max_file_bytes:
        staged.oversized.append(f"{rel} ({st.st_size / 2**20:.1f} MB)")
        return
    check = None if allowed else ContentCheck(rel)
    dst = os.path.join(staged.dir, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # the file checked above, not a swapped-in link
    with os.fdopen(fd, "rb") as f, open(dst, "wb") as out:
        while chunk := f.read(CHUNK):
            if check is not None and check.feed(chunk):
                break
            out.write(chunk)
    what = check.result() if check is not None else None
    if what:
        os.remove(dst)
        staged.credentials.append(f"{rel}: {what} (by its content)")
        return
    os.chmod(dst, stat.S_IMODE(st.st_mode))
