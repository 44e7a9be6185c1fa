"""`gammaray submit` without a cluster: the job plan, credentials by reference only, refusals that
happen before anything is sent, and the "auto" scaling resolution (1 node vs N nodes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray.runtime_env  # noqa: F401 - Ray binds its log handler to sys.stderr at import: not to a capsys stream

from gammaray.app.job_entry import job_spec
from gammaray.config import ConfigError, load
from workers.cluster import ClusterResources, resolve
from infra.errors import SubmitError
from infra.job_client import resolve_token
from infra.jobs import parse_env, parse_secret_refs, plan_job, project_requirements
from infra.staging import JOB_DIR

pytestmark = pytest.mark.ops
ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-" + "9f8e7d6c5b4a39281706f5e4"


@pytest.fixture
def shell_secret(monkeypatch):
    """The submitting shell holds an object-storage secret, as a user's shell does."""
    monkeypatch.setenv("GR_TEST_S3_SECRET", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return SECRET


def _plan(command, **kw):
    kw.setdefault("requirements", "none")
    return plan_job(command, entry=job_spec(), **kw)


def test_plan_ships_the_resolved_config_and_names_credentials_only(shell_secret):
    plan = _plan(["pretrain", "--set", "train.epochs=2"], overrides=["run.name=nightly", "ray.address=auto"],
                 secret_refs=parse_secret_refs(["AWS_SECRET_ACCESS_KEY=GR_TEST_S3_SECRET", "AWS_ACCESS_KEY_ID"]),
                 env=parse_env(["DS_ACCELERATOR=cuda"]))
    try:
        staged = Path(plan.working_dir)
        cfg = load(staged / JOB_DIR / "config.yaml")
        assert cfg.run.name == "nightly" and cfg.ray.address is None  # a local address never travels
        assert cfg.train.epochs == 6  # the command's --set is applied by the job, on top of the file
        assert plan.entrypoint == "python -m gammaray.app.job_entry pretrain --set train.epochs=2"
        env = plan.runtime_env["env_vars"]
        assert env["AWS_SECRET_ACCESS_KEY"] == "${GR_TEST_S3_SECRET}" and env["DS_ACCELERATOR"] == "cuda"
        assert "AWS_ACCESS_KEY_ID" not in env  # same name on the nodes: nothing to map
        job = json.loads((staged / JOB_DIR / "job.json").read_text())
        assert job["secret_refs"] == {"AWS_SECRET_ACCESS_KEY": "GR_TEST_S3_SECRET", "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"}
        assert plan.metadata["gammaray.run_name"] == "nightly" and plan.metadata["gammaray.command"] == "pretrain"
        # the project is staged without tests, environments or VCS data
        assert (staged / "gammaray" / "app" / "cli.py").is_file() and (staged / "gammaray" / "app" / "job_entry.py").is_file()
        assert not (staged / "tests").exists() and not (staged / ".git").exists() and not (staged / ".venv").exists()
        text = json.dumps([plan.entrypoint, plan.runtime_env, plan.metadata, plan.config_yaml])
        assert SECRET not in text
    finally:
        plan.cleanup()
    assert not Path(plan.working_dir).exists()


def test_requirements_come_from_pyproject_and_form_a_valid_runtime_env():
    plan = plan_job(["pretrain"], entry=job_spec(), requirements="auto")
    try:
        pkgs = plan.runtime_env["pip"]["packages"]
        assert pkgs == project_requirements(ROOT)
        assert any(p.startswith("deepspeed") for p in pkgs) and any(p.startswith("ray[") for p in pkgs)
        assert not any(p.startswith("seaweedfs") for p in pkgs)
    finally:
        plan.cleanup()


@pytest.mark.parametrize("how", ["env", "set", "file", "secret-env-value"])
def test_a_literal_secret_is_refused_before_submission(shell_secret, tmp_path, how):
    kw: dict = {}
    if how == "env":
        with pytest.raises(SubmitError, match="by reference"):
            parse_env([f"AWS_SECRET_ACCESS_KEY={SECRET}"])
        kw["env"] = {"S3_OPTS": f"key={SECRET}"}  # a harmless-looking name with the value inside
        where = "runtime_env"
    elif how == "set":
        kw["overrides"] = [f"storage.endpoint_url=http://user:{SECRET}@127.0.0.1:9000"]
        where = "config"
    elif how == "secret-env-value":
        with pytest.raises(SubmitError, match="not an environment variable name"):
            parse_secret_refs([f"AWS_SECRET_ACCESS_KEY={SECRET}"])
        return
    else:
        proj = _copy_project(tmp_path)
        (proj / "configs" / "notes.txt").write_text(f"temporary key {SECRET}\n")
        kw["working_dir"] = str(proj)
        where = "uploaded file configs/notes.txt"
    with pytest.raises(SubmitError) as err:
        _plan(["pretrain"], **kw)
    msg = str(err.value)
    assert "refusing to submit" in msg and where in msg and SECRET not in msg


@pytest.mark.parametrize("command,message", [
    ([], "nothing to run"),
    (["pretrian"], "invalid"),
    (["pretrain", "--set", "loss.gama.alpha=2"], "unknown key 'gama'"),
    (["pretrain", "--config", "x.yaml"], "give --config to `gammaray submit`"),
    (["status"], "runs on your machine"),
])
def test_invalid_commands_fail_before_anything_is_sent(command, message):
    with pytest.raises((SubmitError, ConfigError), match=message):
        _plan(command)


def test_cli_dry_run_and_exit_codes(tmp_path, monkeypatch, capsys):
    from gammaray.app.cli import main

    for k in list(os.environ):
        if k.startswith(("AWS_", "RAY_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GR_SHELL_SECRET", SECRET)

    def run(*args):
        capsys.readouterr()
        rc = main(list(args))
        return (rc, *capsys.readouterr())

    rc, out, err = run("submit", "--dry-run", "--requirements", "none",
                       "--secret-env", "AWS_SECRET_ACCESS_KEY=GR_SHELL_SECRET",
                       "--", "demo", "--storage", "s3://b/p", "--n-train", "200")
    assert rc == 0, err
    plan = json.loads(out[out.index("\n{\n") + 1:])
    assert plan["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "${GR_SHELL_SECRET}"
    assert plan["metadata"]["gammaray.run_dir"] == "s3://b/p/runs/gammaray-demo"
    assert SECRET not in out + err
    assert not os.path.exists(plan["runtime_env"]["working_dir"])  # the staged copy is removed
    rc, out, err = run("submit", "--dry-run", "--env", f"AWS_SECRET_ACCESS_KEY={SECRET}", "--", "pretrain")
    assert rc == 2 and "by reference" in err and SECRET not in err
    rc, out, err = run("status")
    assert rc == 2 and "no cluster address" in err


def test_token_sources_follow_rays_order(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_token(None) == (None, "none")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default-token\n")
    assert resolve_token(None)[0] == "default-token"
    p = tmp_path / "t"
    p.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(p))
    assert resolve_token(None)[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_token(None)[0] == "from-env"
    f = tmp_path / "f"
    f.write_text("from-file")
    assert resolve_token(str(f)) == ("from-file", f"--token-file {f}")
    with pytest.raises(SubmitError, match="no such file"):
        resolve_token(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------
# "auto": one config, 1 or N nodes


def test_cluster_config_scales_from_one_gpu_to_many():
    cfg = load(ROOT / "configs" / "cluster.yaml")
    one, chosen1 = resolve(cfg, ClusterResources(cpus=12, gpus=1, nodes_with_cpus=1))
    many, chosen4 = resolve(cfg, ClusterResources(cpus=4 + 4 * 32, gpus=16, nodes_with_cpus=5))
    assert (one.train.workers, many.train.workers) == (1, 16)
    assert one.data.batch_size == 64 and many.data.batch_size == 32  # 512/16; 512/1 clamped to 64
    # CPUs left by the workers (2 each), shared by their pipelines: (12-2)/1 and (132-32)/16
    assert one.data.preprocess_concurrency == 10 and many.data.preprocess_concurrency == 6
    assert set(chosen1) == set(chosen4) == {"train.workers", "data.batch_size", "data.preprocess_concurrency"}
    # everything else is the same config
    strip = lambda c: {k: v for k, v in c.model_dump().items() if k not in ("train", "data")}  # noqa: E731
    assert strip(one) == strip(many)


def test_auto_rules_and_bounds():
    base = load(overrides=["train.workers=auto", "data.batch_size=auto", "data.preprocess_concurrency=auto"])
    cpu2 = ClusterResources(cpus=4, gpus=0, nodes_with_cpus=2)
    out, _ = resolve(base, cpu2)
    # one worker per node on CPU, 64/2 per worker, (4 - 2 x 0.5) CPUs / 2 pipelines / 1 CPU per task
    assert (out.train.workers, out.data.batch_size, out.data.preprocess_concurrency) == (2, 32, 1)
    capped, _ = resolve(load(overrides=["train.workers=auto", "ray.auto.max_workers=1"]), cpu2)
    assert capped.train.workers == 1
    fixed, chosen = resolve(load(overrides=["train.workers=3", "data.batch_size=8"]), cpu2)
    assert chosen == {} and fixed.train.workers == 3 and fixed.data.batch_size == 8
    with pytest.raises(ConfigError, match="found no GPU"):
        resolve(load(overrides=["train.workers=auto", "train.use_gpu=true"]), cpu2)
    waiting, _ = resolve(load(overrides=["train.workers=auto", "train.use_gpu=true", "ray.auto.min_workers=4"]), cpu2)
    assert waiting.train.workers == 4  # an autoscaler adds the GPU nodes
    small, _ = resolve(load(overrides=["data.batch_size=auto", "ray.auto.global_batch_size=4"]), cpu2)
    assert small.data.batch_size == 8  # 4/2 clamped up to min_micro_batch
    with pytest.raises(ConfigError):
        load(overrides=["train.workers=-1"])
    with pytest.raises(ConfigError):
        load(overrides=["data.batch_size=0"])


def test_resources_from_ray_nodes_count_alive_nodes_only():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Alive": True, "Resources": {"CPU": 0.0}},                     # a head with num-cpus=0
             {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 4.0}}]
    r = ClusterResources.from_ray_nodes(nodes)
    assert (r.cpus, r.gpus, r.nodes_with_cpus) == (2.0, 1.0, 1)


def _copy_project(tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "proj"
    for name in ("gammaray", "infra", "pipelines", "workers", "tuning", "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_job_entry_stops_when_a_promised_credential_is_missing(tmp_path):
    """On the cluster: a reference whose source variable the node lacks stops the job at once,
    naming both variables and no value (Ray expands a missing ${SOURCE} to an empty string)."""
    plan = _plan(["pretrain"], secret_refs=parse_secret_refs(["AWS_SECRET_ACCESS_KEY=GR_NODE_SECRET"]))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(PYTHONPATH=plan.working_dir, AWS_SECRET_ACCESS_KEY="")
        proc = subprocess.run([sys.executable, "-m", "gammaray.app.job_entry", "pretrain"], cwd=plan.working_dir, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3
        assert "AWS_SECRET_ACCESS_KEY (from ${GR_NODE_SECRET})" in proc.stderr
        # (the present case runs in tests/test_ops_cluster.py: the job prints "AWS_SECRET_ACCESS_KEY set")
    finally:
        plan.cleanup()


def test_an_access_key_id_is_not_a_secret_to_scan_for(monkeypatch):
    """The local S3 server's key id is the word "gammaray", which every project file holds; a key id
    names a key pair and is not secret, so it must not block a submission (the secret key still does)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "gammaray")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    plan = _plan(["pretrain"])
    plan.cleanup()
    from infra.credentials import secret_values

    found = secret_values({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
    assert "$AWS_ACCESS_KEY_ID" not in found and found["$AWS_SECRET_ACCESS_KEY"] == SECRET


# ------------------------------------------------------------------------------------------------
# the job's interpreter lacks the project's dependencies


def _run_entry(python: str, plan, **env) -> subprocess.CompletedProcess:
    """`python -m gammaray.app.job_entry pretrain` in the staged working dir, as Ray runs the entrypoint."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run([python, "-m", "gammaray.app.job_entry", "pretrain"], cwd=plan.working_dir, env=base,
                          capture_output=True, text=True, timeout=120)


def test_job_entry_names_the_interpreter_and_the_missing_packages_on_a_bare_python(tmp_path):
    """A cluster whose python has none of the dependencies (a plain image with --requirements none):
    one message naming the interpreter, its version, what is missing and the fix; no traceback."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    plan = _plan(["pretrain"])
    try:
        proc = _run_entry(str(venv / "bin" / "python"), plan)
    finally:
        plan.cleanup()
    assert proc.returncode == 4, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "ModuleNotFoundError" not in err
    assert f"{venv}/bin/python (Python {sys.version_info.major}.{sys.version_info.minor}." in err
    for req in ("torch>=", "pyarrow>=", "deepspeed>=", "ray[train,data,tune,default]>=", "pillow>=", "(import PIL)"):
        assert req in err, req
    assert "--requirements auto" in err and "Dockerfile.gpu" in err
    assert len(err.strip().splitlines()) == 1


def test_job_entry_names_exactly_the_one_missing_package(tmp_path):
    """An environment that is this test's own, minus pyarrow (a venv whose site-packages links every
    installed distribution but pyarrow's): the message lists pyarrow and nothing else."""
    import site

    venv = tmp_path / "nopyarrow"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    ours = Path(site.getsitepackages()[0])
    theirs = next(venv.glob("lib/python*/site-packages"))
    hidden = 0
    for entry in ours.iterdir():
        if entry.name.lower().startswith("pyarrow"):
            hidden += 1
            continue
        (theirs / entry.name).symlink_to(entry)
    assert hidden >= 2  # the package and its dist-info
    plan = _plan(["pretrain"])
    try:
        python = str(venv / "bin" / "python")
        assert subprocess.run([python, "-c", "import torch, yaml"], capture_output=True, timeout=120).returncode == 0
        proc = _run_entry(python, plan)
    finally:
        plan.cleanup()
    assert proc.returncode == 4, proc.stderr
    assert re.search(r"it lacks pyarrow>=[0-9.]+\. Fix:", proc.stderr) and "Traceback" not in proc.stderr
