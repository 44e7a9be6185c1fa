"""`gammaray submit | status | logs | stop`: run gammaray subcommands as Ray jobs on a cluster.

The work is in infra/jobs.py (plan, credential checks, Ray Jobs client); this module is the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import add_config_args

SUBMIT_EPILOG = """examples:
  gammaray submit --address http://HEAD:8265 --config configs/cluster.yaml --follow \\
      --secret-env AWS_ACCESS_KEY_ID --secret-env AWS_SECRET_ACCESS_KEY -- pretrain
  gammaray submit --address http://127.0.0.1:8265 --requirements none --follow \\
      -- demo --storage s3://bucket/demo --n-train 200 --n-val 50 --set train.epochs=1

upload: git's view of the project (tracked and unignored files; every file when it is not a git
checkout), minus tests, environments and --exclude. A symlink leaving the project is not followed.
Files that look like credentials (id_rsa, .ssh/, .netrc, a kubeconfig, a service-account JSON,
*.tfstate, .env, .pypirc, credentials, a private-key block in any file) stop the submission: add
them to .gitignore or --exclude them, or --allow-file PATH when one holds no secret.

credentials: never give values. --secret-env NAME says the cluster's nodes hold NAME; --secret-env
TARGET=SOURCE makes TARGET the value of the nodes' SOURCE (Ray expands ${SOURCE} on each node).
Submission is refused if the value of any credential of this shell (a credential-like name, the
config's storage.secret_key_env, a secret-looking value under any name, a password inside a URL
variable) or the Ray token would end up in the job's entrypoint, env vars, metadata, config or
uploaded files, or if a URL there (a --requirements index URL, an --env value, the config) carries
a user name or password.

token: Ray 2.60 clusters require one. Sent from --token-file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, in that order.

exit codes: 0 submitted (or, with --follow, SUCCEEDED); 1 the job FAILED or was STOPPED; 2 refused
before submitting (invalid command or config, a credential in the plan); 3 the cluster refused the
token; 4 --follow timed out while the job still runs."""


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="URL",
                   help="Ray Jobs API of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                        "~/.ray/auth_token)")


def _client(args):
    from infra.job_client import JobClient

    return JobClient(args.address, token_file=args.token_file)


def _errors(fn):
    def run(args: argparse.Namespace) -> int:
        from infra.errors import AuthError, SubmitError

        try:
            return fn(args)
        except AuthError as err:
            print(f"gammaray {args.command}: {err}", file=sys.stderr)
            return 3
        except SubmitError as err:
            print(f"gammaray {args.command}: {err}", file=sys.stderr)
            return 2
    return run


@_errors
def run_submit(args: argparse.Namespace) -> int:
    from gammaray.app.job_entry import job_spec
    from infra.job_client import resolve_token
    from infra.jobs import parse_env, parse_secret_refs, plan_job

    command = list(args.job_command)
    if command and command[0] == "--":
        command = command[1:]
    token = None
    if not args.dry_run:
        token, _ = resolve_token(args.token_file)
    plan = plan_job(command, args.config, args.overrides, entry=job_spec(), working_dir=args.working_dir,
                    requirements=args.requirements, env=parse_env(args.env),
                    secret_refs=parse_secret_refs(args.secret_env), submission_id=args.submission_id,
                    excludes=args.exclude, allow_files=args.allow_file, entrypoint_num_cpus=args.entrypoint_num_cpus,
                    entrypoint_num_gpus=args.entrypoint_num_gpus, extra_secrets=[token] if token else [],
                    max_file_mb=args.max_file_mb)
    try:
        for f in plan.skipped_files:
            print(f"gammaray submit: not uploaded: {f}", file=sys.stderr)
        print("gammaray submit: job plan\n" + plan.describe(), flush=True)
        if args.dry_run:
            print(json.dumps({"entrypoint": plan.entrypoint, "runtime_env": plan.runtime_env,
                              "metadata": plan.metadata}, indent=2))
            return 0
        from infra.job_client import JobClient

        client = JobClient(args.address, token_file=args.token_file)
        job_id = client.submit(plan)
    finally:
        plan.cleanup()
    print(f"gammaray submit: submitted {job_id} to {client.address}", flush=True)
    result = {"submission_id": job_id, "address": client.address, **plan.metadata}
    status = None
    if args.follow:
        status = client.follow(job_id, timeout_s=args.timeout)
        print(f"\ngammaray submit: job {job_id} {status}", flush=True)
        result["status"] = status
    else:
        hint = f"--address {client.address}" + (f" --token-file {args.token_file}" if args.token_file else "")
        print(f"  follow:  gammaray logs {job_id} --follow {hint}\n  status:  gammaray status {job_id} {hint}\n"
              f"  stop:    gammaray stop {job_id} {hint}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if status is None:
        return 0
    return {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}.get(status, 4)


@_errors
def run_status(args: argparse.Namespace) -> int:
    from infra.job_client import job_summary

    client = _client(args)
    if args.job_id:
        summary = job_summary(client.info(args.job_id))
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for k, v in summary.items():
                print(f"{k:<17} {v}")
        return 0
    jobs = [job_summary(j) for j in client.list()]
    if not args.all:
        jobs = [j for j in jobs if j["metadata"]]
    jobs.sort(key=lambda j: j["start_time"] or "")
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print("no gammaray jobs on this cluster" + ("" if args.all else " (--all lists every job)"))
        return 0
    print(f"{'SUBMISSION ID':<52} {'STATUS':<10} {'COMMAND':<9} {'RUN':<20} STARTED")
    for j in jobs:
        md = j["metadata"]
        print(f"{j['submission_id'] or '-':<52} {j['status']:<10} {md.get('gammaray.command', '-'):<9} "
              f"{md.get('gammaray.run_name', '-'):<20} {j['start_time'] or '-'}")
    return 0


@_errors
def run_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        status = client.follow(args.job_id, timeout_s=args.timeout)
        print(f"\ngammaray logs: job {args.job_id} {status}", file=sys.stderr)
        return {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}.get(status, 4)
    sys.stdout.write(client.logs(args.job_id))
    return 0


@_errors
def run_stop(args: argparse.Namespace) -> int:
    import time

    client = _client(args)
    stopped = client.stop(args.job_id)
    if not stopped:
        print(f"gammaray stop: {args.job_id} was not running ({client.status(args.job_id)})")
        return 0
    print(f"gammaray stop: stop requested for {args.job_id}", flush=True)
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            st = client.status(args.job_id)
            if st.is_terminal():
                print(f"gammaray stop: {args.job_id} {st}")
                return 0
            time.sleep(1.0)
        print(f"gammaray stop: {args.job_id} still not stopped after {args.timeout:g} s", file=sys.stderr)
        return 4
    return 0


def register(sub) -> None:
    from infra.staging import DEFAULT_MAX_FILE_MB  # standard library only: cheap at start-up

    p = sub.add_parser("submit", help="run a gammaray subcommand as a Ray job on a cluster (Ray Jobs)",
                       description="Validate the config and the subcommand here, stage the project with the "
                                   "resolved config as the job's working_dir, and submit it through the Ray Jobs "
                                   "API with the project's requirements and environment variables. Credentials "
                                   "travel by reference only.",
                       epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _client_args(p)
    add_config_args(p)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit code = outcome")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="with --follow: stop following after S seconds (the job keeps running)")
    p.add_argument("--requirements", default="auto", metavar="auto|none|FILE",
                   help="pip packages installed by Ray on each node: auto = the project's dependencies "
                        "(pyproject.toml), none = the image has them, or a requirements file (default auto)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a non-secret environment variable for the job (repeatable; credential-like names are refused)")
    p.add_argument("--secret-env", action="append", default=[], metavar="NAME[=SOURCE]",
                   help="a credential by reference: NAME is held by the nodes, or NAME := the nodes' SOURCE (repeatable)")
    p.add_argument("--working-dir", metavar="DIR", help="project directory to upload (default: this gammaray checkout)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out files or folders matching PATTERN (fnmatch on any path part; /PATTERN: from the project root; repeatable)")
    p.add_argument("--allow-file", action="append", default=[], metavar="PATTERN",
                   help="upload files matching PATTERN even though their name or content looks like a credential "
                        "(a test fixture, a public certificate; same matching as --exclude; repeatable)")
    p.add_argument("--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB, metavar="MB",
                   help=f"refuse to upload a project file larger than this (default {DEFAULT_MAX_FILE_MB:g}; data "
                        "belongs in object storage); the refusal names the file")
    p.add_argument("--submission-id", metavar="ID", help="job id (default gammaray-<command>-<run>-<time>-<rand>)")
    p.add_argument("--entrypoint-num-cpus", type=float, metavar="N", help="CPUs reserved for the job's driver")
    p.add_argument("--entrypoint-num-gpus", type=float, metavar="N", help="GPUs reserved for the job's driver")
    p.add_argument("--dry-run", action="store_true", help="print the job plan and runtime env, submit nothing")
    p.add_argument("--json", metavar="PATH", help="write the submission id, metadata and final status as JSON")
    p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ...",
                   help="the gammaray subcommand to run on the cluster, after `--`")
    p.set_defaults(func=run_submit)

    p = sub.add_parser("status", help="status of a gammaray job, or the list of gammaray jobs on a cluster",
                       description="With JOB_ID: status, message, times, gammaray metadata and the names of the "
                                   "job's env vars. Without: one line per gammaray job.")
    p.add_argument("job_id", nargs="?", metavar="JOB_ID", help="submission id (omit to list the jobs)")
    _client_args(p)
    p.add_argument("--all", action="store_true", help="list jobs not submitted by gammaray too")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_status)

    p = sub.add_parser("logs", help="print or follow the logs of a job",
                       description="Print the job's driver logs so far, or stream them until it ends (--follow).")
    p.add_argument("job_id", metavar="JOB_ID", help="submission id")
    _client_args(p)
    p.add_argument("--follow", action="store_true", help="stream until the job ends; exit code = outcome")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="with --follow: give up after S seconds")
    p.set_defaults(func=run_logs)

    p = sub.add_parser("stop", help="stop a running job",
                       description="Ask Ray to stop the job (SIGTERM to the driver, then SIGKILL); the run's last "
                                   "checkpoint stays in the run storage, and submitting the same run resumes it.")
    p.add_argument("job_id", metavar="JOB_ID", help="submission id")
    _client_args(p)
    p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="with --wait: give up after S seconds")
    p.set_defaults(func=run_stop)
