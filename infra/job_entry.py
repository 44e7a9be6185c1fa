"""What a gammaray job runs on the cluster: `python -m infra.job_entry <subcommand ...>`.

`gammaray submit` stages the project with `.gammaray_job/config.yaml` (the resolved config) and
`.gammaray_job/job.json` (the names of the credentials the job was promised). This entry point
runs in the job's working directory on the head node:

1. every credential passed by reference (`--secret-env TARGET=SOURCE`) must be present: Ray has
   expanded `${SOURCE}` from the node's environment into TARGET; a missing one stops the job with a
   message naming both variables (never a value);
2. the config's object-storage credential variables (storage.access_key_env / secret_key_env) are
   reported as set or not; unset is allowed (instance profiles, IRSA, local storage);
3. the gammaray CLI runs the subcommand with `--config .gammaray_job/config.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys

JOB_DIR = ".gammaray_job"


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
    from gammaray.cli import main as cli_main

    return cli_main(full)


if __name__ == "__main__":
    sys.exit(main())
