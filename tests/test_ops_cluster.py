"""A real two-node Ray cluster on 127.0.0.1 (`ray start --head` + `ray start --address`, token
authentication on), driven through the `gammaray` CLI as a user would:

- a submission without the cluster's token, or with another token, is refused and creates no job;
- the demo, scaled down, is submitted with `gammaray submit --follow`, trains across both nodes
  (train.workers=auto resolves to one worker per node), and its result is read back from the run
  storage (a SeaweedFS S3 server);
- the object-storage secret reaches the job only by reference (`--secret-env`), and a planted value
  appears nowhere: not in the job's metadata, its logs, the cluster's log and working directories,
  the checkpoints or the saved config;
- `gammaray status`, `logs` and `stop` work against the same cluster.

The cluster has its own temp dir and ports and is torn down by process session (never `ray stop`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time

import pytest
import ray.job_submission  # noqa: F401 - Ray binds its log handler to sys.stderr at import: not to a capsys stream

pytestmark = pytest.mark.ops
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gammaray-ops"


def cli_env(**extra: str) -> dict[str, str]:
    """The submitting user's shell: no AWS_* of the test session, no other cluster's address or token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_AUTH_",
                                                                    "RAY_API_SERVER"))}
    env.update({"PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu"}, **extra)
    return env


def gammaray(args: list[str], env: dict[str, str], timeout: float = 120, cwd: str | None = None):
    """The CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "gammaray.app.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd or ROOT)


@pytest.fixture
def cli(monkeypatch, capsys, ops_env):
    """The CLI in this process (no interpreter start-up): HOME without a token, no other cluster's variables."""
    from gammaray.app.cli import main

    monkeypatch.setenv("HOME", ops_env["home"])
    for k in list(os.environ):
        if k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "RAY_API_SERVER")):
            monkeypatch.delenv(k)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return run


# a very small model: the job's time goes to Ray, not to the encoders
TINY = ["--set", "model.embed_dim=32",
        "--set", "model.image.hf_config={model_type: vit, image_size: 64, patch_size: 16, hidden_size: 32, "
                 "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
        "--set", "model.text.hf_config={model_type: bert, hidden_size: 32, num_hidden_layers: 1, "
                 "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"]


@pytest.fixture(scope="module")
def ops_env(tmp_path_factory):
    """An S3 server whose secret key is the planted secret, and a 2-node cluster whose nodes hold the
    credentials under their own names (as a Kubernetes Secret would put them in the pods' env)."""
    from infra.localcluster import LocalRayCluster
    from infra.s3server import SeaweedS3

    planted = "gr-planted-" + secrets.token_hex(16)
    home = tmp_path_factory.mktemp("home")  # a HOME without ~/.ray/auth_token
    s3 = SeaweedS3(bucket=BUCKET, secret_key=planted, export_env=False).start()
    cluster = LocalRayCluster(nodes=2, cpus_per_node=2, env={
        "GR_S3_KEY": s3.access_key, "GR_S3_SECRET": planted, "DS_ACCELERATOR": "cpu"})
    try:
        t0 = time.perf_counter()
        cluster.start()
        print(f"two-node cluster up in {time.perf_counter() - t0:.1f} s: {cluster.dashboard_url}")
        yield {"s3": s3, "cluster": cluster, "planted": planted, "home": str(home)}
    finally:
        cpu = cluster_cpu_seconds(cluster)
        t0 = time.perf_counter()
        cluster.stop()
        s3.stop()
        print(f"cluster processes used {cpu:.0f} CPU-seconds; torn down in {time.perf_counter() - t0:.1f} s")
        assert not cluster.our_processes()


def cluster_cpu_seconds(cluster) -> float:
    """CPU time of the live cluster processes and of the workers they reaped (a cost figure for CI)."""
    total = 0.0
    for p in cluster.our_processes():
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except Exception:  # noqa: BLE001 - exited meanwhile
            pass
    return total


def boto(s3):
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                        aws_secret_access_key=s3.secret_key, region_name="us-east-1")


@pytest.mark.timeout(480)  # includes starting the cluster (up to 3 tries per node on a loaded machine)
def test_submission_without_the_clusters_token_is_refused(ops_env, cli, tmp_path):
    import requests

    c = ops_env["cluster"]
    # the cluster itself refuses an anonymous job request (Ray 2.60 token authentication)
    r = requests.post(f"{c.dashboard_url}/api/jobs/", json={"entrypoint": "echo hi"}, timeout=30)
    assert r.status_code == 401, r.text
    args = ["--address", c.dashboard_url, "--requirements", "none", "--submission-id", "must-not-exist",
            "--", "config", "show"]
    no_token = cli("submit", *args)
    assert no_token.returncode == 3, no_token.stdout + no_token.stderr
    assert "refused" in no_token.stderr and "requires a token" in no_token.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    other = cli("submit", "--token-file", str(wrong), *args)
    assert other.returncode == 3, other.stdout + other.stderr
    assert "is not this cluster's" in other.stderr
    # everything the cluster serves listens on the loopback address only
    import psutil

    pids = {p.pid for p in c.our_processes()}
    listening = {(cn.laddr.ip, cn.laddr.port) for cn in psutil.net_connections(kind="inet")
                 if cn.pid in pids and cn.status == psutil.CONN_LISTEN}
    assert len(listening) >= 10 and {ip for ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    # neither created a job; with the token the same client sees the (empty) job list
    ok = cli("status", "--all", "--json", "--address", c.dashboard_url, "--token-file", c.token_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == []


@pytest.mark.timeout(600)
def test_demo_submitted_to_two_nodes_follows_to_success_without_leaking_the_secret(ops_env, cli, tmp_path):
    import requests

    c, s3, planted = ops_env["cluster"], ops_env["s3"], ops_env["planted"]
    out_json = tmp_path / "submit.json"
    # the user's shell holds the secret too (under the name the nodes use): submit must not copy it
    env = cli_env(HOME=ops_env["home"], GR_S3_SECRET=planted)
    t0 = time.perf_counter()
    proc = gammaray([
        "submit", "--address", c.dashboard_url, "--token-file", c.token_path, "--follow", "--timeout", "540",
        "--requirements", "none",  # the nodes run this venv (Ray would clone a whole venv for pip)
        "--secret-env", "AWS_ACCESS_KEY_ID=GR_S3_KEY", "--secret-env", "AWS_SECRET_ACCESS_KEY=GR_S3_SECRET",
        "--set", f"storage.endpoint_url={s3.endpoint}", "--set", "run.name=opsrun", "--json", str(out_json),
        "--", "demo", "--storage", f"s3://{BUCKET}/demo", "--n-train", "200", "--n-val", "50", "--bad-records", "0",
        "--quiet", "--set", "train.epochs=1", *TINY,
        # one config for 1 or N nodes: workers and micro-batch come from the cluster's resources
        "--set", "train.workers=auto", "--set", "data.batch_size=auto", "--set", "data.preprocess_concurrency=auto",
        # 1.5 of each node's 2 CPUs per worker: the two workers cannot share a node
        "--set", "train.cpus_per_worker=1.5", "--set", "data.preprocess_num_cpus=0.25",
    ], env, timeout=580, cwd=str(tmp_path))
    wall = time.perf_counter() - t0
    print(f"gammaray submit --follow: {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout and "== summary" in proc.stdout
    assert "gammaray job: AWS_SECRET_ACCESS_KEY set" in proc.stdout  # the reference was expanded on the node
    assert "auto scaling on 2 node(s), 4 CPUs, 0 GPUs: train.workers=2, data.batch_size=32" in proc.stdout
    sub = json.loads(out_json.read_text())
    job_id = sub["submission_id"]
    assert sub["status"] == "SUCCEEDED" and sub["gammaray.run_dir"] == f"s3://{BUCKET}/demo/runs/opsrun"

    # the two training workers ran on the two different nodes
    r = requests.get(f"{c.dashboard_url}/api/v0/actors", params={"limit": 1000, "detail": "true"},
                     headers=c.auth_headers(), timeout=30).json()
    nodes = {a["node_id"] for a in r["data"]["result"]["result"] if a["class_name"] == "RayTrainWorker"}
    assert len(nodes) == 2, nodes

    # the result, read from the run storage: final metrics of 2 workers, a checkpoint with the resolved config
    client = boto(s3)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    metrics = client.get_object(Bucket=BUCKET, Key="demo/runs/opsrun/metrics.jsonl")["Body"].read().decode()
    final = json.loads(metrics.splitlines()[-1])
    assert final["final"] == 1 and final["workers"] == 2 and final["samples_seen_total"] == 200
    assert final["val_records"] == 50
    cfg_keys = [k for k in keys if re.fullmatch(r"demo/runs/opsrun/checkpoint_[^/]+/config\.json", k)]
    assert cfg_keys, keys[:50]
    saved = json.loads(client.get_object(Bucket=BUCKET, Key=cfg_keys[-1])["Body"].read())
    assert saved["train"]["workers"] == 2 and saved["data"]["batch_size"] == 32  # "auto", resolved
    assert saved["storage"]["secret_key_env"] == "AWS_SECRET_ACCESS_KEY"  # a name, not a value

    # the job's metadata holds references only
    from infra.job_client import JobClient

    jc = JobClient(c.dashboard_url, token_file=c.token_path)
    info = jc.info(job_id)
    assert info.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "${GR_S3_SECRET}"
    assert info.metadata["gammaray.secret_refs"] == ("AWS_ACCESS_KEY_ID=${GR_S3_KEY},"
                                                     "AWS_SECRET_ACCESS_KEY=${GR_S3_SECRET}")
    status = cli("status", job_id, "--json", "--address", c.dashboard_url, "--token-file", c.token_path)
    logs = cli("logs", job_id, "--address", c.dashboard_url, "--token-file", c.token_path)
    listing = cli("status", "--address", c.dashboard_url, "--token-file", c.token_path)
    assert status.returncode == logs.returncode == listing.returncode == 0
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    assert "== summary" in logs.stdout and job_id in listing.stdout

    # the planted secret: present on the nodes (so its absence below means something) ...
    assert any(planted.encode() in _environ(p.pid) for p in c.our_processes() if p.name() == "raylet")
    needles = [planted.encode(), base64.b64encode(planted.encode()), planted.encode().hex().encode()]
    dump = info.model_dump_json() if hasattr(info, "model_dump_json") else info.json()
    texts = {"job metadata": dump.encode(),
             "submit output": (proc.stdout + proc.stderr).encode(), "status": status.stdout.encode(),
             "logs": logs.stdout.encode(), "listing": listing.stdout.encode()}
    for key in keys:  # checkpoints, saved config, metrics, TensorBoard, catalogue
        texts[f"s3://{BUCKET}/{key}"] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    scanned_files = 0
    for dirpath, _, files in os.walk(c.temp_dir):  # every node's logs and unpacked working_dir
        for fn in files:
            path = os.path.join(dirpath, fn)
            if fn == "auth_token" or not os.path.isfile(path) or os.path.islink(path):
                continue
            try:
                with open(path, "rb") as f:
                    texts[path] = f.read()
                scanned_files += 1
            except OSError:
                continue
    leaks = [where for where, data in texts.items() if any(n in data for n in needles)]
    assert leaks == [], leaks
    # ... and the scan covered what it claims: the run's checkpoint, both nodes' logs, the staged config
    assert b'"name": "opsrun"' in texts[f"s3://{BUCKET}/{cfg_keys[-1]}"]
    assert any(os.path.basename(p) == "config.yaml" and ".gammaray_job" in p for p in texts)
    assert sum("raylet.out" in p for p in texts) >= 2 and scanned_files > 50
    print(f"planted secret absent from {len(texts)} texts ({len(keys)} S3 objects, {scanned_files} cluster files)")


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.timeout(240)
def test_stop_ends_a_running_job(ops_env, cli, tmp_path):
    c = ops_env["cluster"]
    out_json = tmp_path / "submit.json"
    # TMPDIR: the stopped demo leaves its half-written raw catalogue where pytest cleans up
    sub = cli("submit", "--address", c.dashboard_url, "--token-file", c.token_path, "--requirements", "none",
              "--env", f"TMPDIR={tmp_path}", "--json", str(out_json), "--set", "run.name=opsstop", "--",
              "demo", "--storage", str(tmp_path / "never"), "--n-train", "200000", "--quiet")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = json.loads(out_json.read_text())["submission_id"]
    from infra.job_client import JobClient

    jc = JobClient(c.dashboard_url, token_file=c.token_path)
    deadline = time.monotonic() + 120
    while "generating a synthetic catalogue" not in jc.logs(job_id):
        assert time.monotonic() < deadline, jc.logs(job_id)[-2000:]
        assert not jc.status(job_id).is_terminal(), jc.logs(job_id)[-2000:]
        time.sleep(1.0)
    stop = cli("stop", job_id, "--wait", "--timeout", "90", "--address", c.dashboard_url, "--token-file", c.token_path)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert str(jc.status(job_id)) == "STOPPED"
