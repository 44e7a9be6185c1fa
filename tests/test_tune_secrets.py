"""Credentials are never serialized: with the S3 keys in environment variables of unusual names
(`storage.access_key_env` / `secret_key_env`, the route the config documents), `gammaray tune` (its
trial a TorchTrainer run of the training loop) runs against the session's S3 server, and then the
secret is searched for in
every object of the bucket (checkpoints, Tune's tuner.pkl and experiment state, metrics, configs),
in every Ray session directory on this machine, and in the run's local outputs. A main-branch run
wrote it into <run.storage>/<experiment>/tuner.pkl: Ray Tune pickled the S3 filesystem object that
had been built with the key.

The CLI runs in its own process with its own local Ray instance, started with those variables in
its environment (as on a cluster whose nodes hold them) and without the standard AWS_* keys.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from pipelines import storage
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.tune
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLI = textwrap.dedent("""
    import json, sys
    import ray
    from gammaray.app.cli import main
    codes = [main(argv) for argv in json.loads(sys.argv[1])]
    print("SESSION " + ray._private.worker._global_node.get_session_dir_path(), flush=True)
    print("CODES " + json.dumps(codes), flush=True)
""")


def files_containing(paths: list[str], needle: bytes) -> list[str]:
    hits = []
    for top in paths:
        for root, _, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        if needle in f.read():
                            hits.append(path)
                except OSError:  # sockets, files removed meanwhile
                    continue
    return hits


@pytest.mark.timeout(1200)
def test_secret_in_unusual_variables_never_reaches_storage_or_ray(s3, small_catalogue, tmp_path, request):
    secret = s3.secret_key
    assert len(secret) >= 16
    over = tiny_overrides(small_catalogue, s3.url("secrets", "runs"), "secret-run")
    over.update({
        "storage.access_key_env": "GAMMARAY_TEST_KEY_ID", "storage.secret_key_env": "GAMMARAY_TEST_SECRET",
        "train.workers": 2, "train.cpus_per_worker": 0.25, "data.preprocess_num_cpus": 0.5, "train.max_steps": 2,
        "train.log_every": 1, "train.checkpoint_every": 1, "ray.num_cpus": 4,
        "tune.samples": 1, "tune.scheduler": "fifo", "tune.searcher": "random", "tune.name": "secret-tune",
    })
    args = [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    # a trial is a TorchTrainer run of the training loop (workers, checkpoints, Ray Data): the
    # submitted demo of tests/test_ops_cluster.py checks `pretrain` itself for the secret
    argvs = [["tune", "--quiet", "--out", str(tmp_path / "tune-out"), *args]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS")}
    # the commands' own TMPDIR (what they leave there is checked at the end); short: Ray's socket
    # paths under it must stay within AF_UNIX's 107 bytes
    tmpdir = tempfile.mkdtemp(prefix="gr-tmp-", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(tmpdir, ignore_errors=True))
    env.update(GAMMARAY_TEST_KEY_ID=s3.access_key, GAMMARAY_TEST_SECRET=secret, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu",
               TMPDIR=str(tmpdir))
    proc = subprocess.run([sys.executable, "-c", CLI, json.dumps(argvs)], capture_output=True, text=True, env=env,
                          timeout=1100, cwd=str(tmp_path))
    left = sorted(os.listdir(tmpdir))
    assert "CODES [0]" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    session_dir = proc.stdout.split("SESSION ", 1)[1].splitlines()[0]

    # it really ran, in S3: Tune's state, the trial's and the run's checkpoints
    objects = storage.list_files(s3.url(""))
    assert any(o.endswith("secret-tune/tuner.pkl") for o in objects)
    assert any("secret-tune/train/" in o and o.endswith("rank-00001/loss_state.pt") for o in objects)
    assert any("secret-tune/train/" in o and o.endswith("portable.pt") for o in objects)
    # ... and nothing holds the secret: no object of the bucket, no Ray session, no local output
    leaked = [o for o in objects if secret.encode() in storage.read_bytes(o)]
    assert leaked == []
    sessions = sorted(set(glob.glob("/tmp/ray/session_*")) | set(glob.glob(f"{tmpdir}/ray/session_*")) | {session_dir})
    assert session_dir in sessions and os.path.isdir(os.path.join(session_dir, "logs"))
    assert files_containing([*sessions, str(tmp_path)], secret.encode()) == []
    # the process and its local Ray instance left nothing in TMPDIR but Ray's session folder: a main-branch
    # command left a `pymp-*` folder (the dashboard's multiprocessing folder; Ray kills the dashboard)
    assert left == ["ray"], left
    # (the search itself finds a secret where there is one)
    control = tmp_path / "tune-out" / "control.txt"
    control.write_bytes(f"key={secret}".encode())
    assert files_containing([str(tmp_path)], secret.encode()) == [str(control)]


def test_tune_copies_no_credential_into_a_trial_runtime_env(monkeypatch):
    """Ray Tune puts the driver's AWS_* variables into each trial actor's runtime_env, which Ray logs in
    clear text (runtime_env_agent.log) on every node: `run_tune` drops them from that copy."""
    from ray.tune.execution import class_cache

    from tuning.search import keep_credentials_out_of_trial_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-of-the-driver")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-of-the-driver-0123456789")
    from tuning.search import CREDENTIAL_ENV_NOT_PROPAGATED

    # Ray's list as Ray ships it (an earlier run_tune in this process may have trimmed it already)
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE",
                        set(class_cache.ENV_VARS_TO_PROPAGATE) | CREDENTIAL_ENV_NOT_PROPAGATED)

    class Trainable:
        pass

    def env_of_trial() -> dict:
        return class_cache._ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]

    assert env_of_trial()["AWS_SECRET_ACCESS_KEY"] == "secret-of-the-driver-0123456789"  # what Ray does
    keep_credentials_out_of_trial_env()
    env = env_of_trial()
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    assert env["PL_DISABLE_FORK"] == "1"  # Tune's own variables still travel
