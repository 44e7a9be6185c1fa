"""What a gammaray job runs on the cluster: `python -m gammaray.app.job_entry <subcommand ...>`.

`gammaray submit` stages the project with `.gammaray_job/config.yaml` (the resolved config) and
`.gammaray_job/job.json` (the names of the credentials the job was promised, the modules it
imports). This entry point runs in the job's working directory on the head node, with whatever
interpreter Ray gave the job (the image's python, or the virtualenv of `--requirements auto`):

0. the project's dependencies must be importable (found, not imported: this costs milliseconds);
   if any is missing, one message names the interpreter, its version, the missing packages and the
   fix, instead of a ModuleNotFoundError traceback from deep inside the CLI (exit 4);
1. every credential passed by reference (`--secret-env TARGET=SOURCE`) must be present: Ray has
   expanded `${SOURCE}` from the node's environment into TARGET; a missing one stops the job with a
   message naming both variables (never a value);
2. the config's object-storage credential variables (storage.access_key_env / secret_key_env) are
   reported as set or not; unset is allowed (instance profiles, IRSA, local storage);
3. the gammaray CLI runs the subcommand with `--config .gammaray_job/config.yaml`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import sys

from infra.staging import JOB_DIR  # standard library only: safe before the dependency check
IMPORTS_MISSING = 4  # exit code: the interpreter lacks the project's dependencies


def missing_imports(imports: dict[str, str], requires_python: str | None = None) -> list[str]:
    """The requirements of `imports` ({module: requirement}) this interpreter cannot import, and
    the Python version when it is below `requires_python`'s lower bound (">=3.10")."""
    missing = []
    m = re.search(r">=\s*(\d+)\.(\d+)", requires_python or "")
    if m and sys.version_info[:2] < (int(m.group(1)), int(m.group(2))):
        missing.append(f"Python {requires_python}")
    for module, requirement in imports.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            name = re.match(r"[A-Za-z0-9._-]*", requirement).group(0)
            same = re.sub(r"[-.]", "_", name).lower() == module.lower()
            missing.append(requirement if same else f"{requirement} (import {module})")
    return missing


def imports_message(missing: list[str]) -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    return (f"gammaray job: {sys.executable} (Python {version}) cannot run gammaray: it lacks "
            f"{', '.join(missing)}. Fix: submit with `gammaray submit --requirements auto` (Ray installs the "
            f"project's dependencies from pyproject.toml into a virtualenv on each node), or run the cluster on an "
            f"image that has them (infra/docker/Dockerfile.gpu) and keep --requirements none.")


def job_spec():
    """This entry point as `gammaray submit` hands it to infra's job plan (infra imports no CLI)."""
    from gammaray.app.cli import build_parser
    from infra.jobs import JobEntry

    return JobEntry(parser=build_parser(), module="gammaray.app.job_entry",
                    files=("gammaray/app/cli.py", "gammaray/app/job_entry.py"))


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    job_dir = os.path.join(os.getcwd(), JOB_DIR)
    cfg_path = os.path.join(job_dir, "config.yaml")
    try:
        with open(os.path.join(job_dir, "job.json")) as f:
            job = json.load(f)
    except FileNotFoundError:
        print(f"gammaray job: {job_dir}/job.json is missing: was this job submitted with `gammaray submit`?",
              file=sys.stderr)
        return 2

    lacking = missing_imports(job.get("imports", {}), job.get("requires_python"))
    if lacking:
        print(imports_message(lacking), file=sys.stderr, flush=True)
        return IMPORTS_MISSING

    missing = []
    for target, source in sorted(job.get("secret_refs", {}).items()):
        if not os.environ.get(target):
            missing.append(target if target == source else f"{target} (from ${{{source}}})")
    if missing:
        print("gammaray job: credentials promised by reference are not set on this node: " + ", ".join(missing)
              + ". Provide them in the nodes' environment (KubeRay: env valueFrom.secretKeyRef of the head and "
              "worker containers; cluster launcher: the nodes' environment or an instance profile).",
              file=sys.stderr)
        return 3
    for name in job.get("credential_env", []):
        state = "set" if os.environ.get(name) else "not set (the default credential chain applies)"
        print(f"gammaray job: {name} {state}", flush=True)

    with open(cfg_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:16]
    full = [*command, "--config", cfg_path] if job.get("accepts_config", True) else command
    print(f"gammaray job: gammaray {shlex.join(command)}  (config {JOB_DIR}/config.yaml, sha256 {sha})", flush=True)
    try:
        from gammaray.app.cli import main as cli_main
    except ModuleNotFoundError as err:  # a dependency of a dependency (the check above covers the direct ones)
        print(imports_message([err.name or str(err)]), file=sys.stderr, flush=True)
        return IMPORTS_MISSING
    return cli_main(full)


if __name__ == "__main__":
    sys.exit(main())
