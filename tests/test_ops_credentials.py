"""What `gammaray submit` uploads and refuses: git's view of the project, symlinks that leave it,
credential files by name and by content, URLs with passwords, and secret values under any name.
All on real project copies (a real `git init`, real symlinks), nothing sent to a cluster."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gammaray.app.job_entry import job_spec
from infra.credentials import looks_like_secret
from infra.errors import SubmitError
from infra.jobs import parse_env, parse_secret_refs, plan_job
from tests.test_ops_submit import _copy_project

pytestmark = pytest.mark.ops
# generated-looking values, built here so no file of the project holds them
TOKEN = "Zq7Xv2Lm" + "9Pw4Rt8Ks1Nb6Hd3"
PEM = "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def _plan(proj: Path, command=("pretrain",), **kw):
    kw.setdefault("requirements", "none")
    return plan_job(list(command), entry=job_spec(), working_dir=str(proj), **kw)


def _staged(plan) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(plan.working_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, plan.working_dir)] = Path(path).read_bytes()
    return out


def _git(proj: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(proj), *args], check=True, capture_output=True, timeout=60)


# ------------------------------------------------------------------------------------------------
# git's view of the project


def test_staging_uploads_what_git_tracks_or_would_track(tmp_path):
    proj = _copy_project(tmp_path)
    (proj / ".gitignore").write_text("scratch/\n*.log\n.env\n")
    _git(proj, "init", "-q")
    (proj / "configs" / "gone.yaml").write_text("a: 1\n")
    _git(proj, "add", "gammaray", "configs", ".gitignore")
    (proj / "configs" / "gone.yaml").unlink()                          # tracked, then deleted: not an error
    (proj / "configs" / "extra.yaml").write_text("b: 2\n")             # untracked, not ignored: uploaded
    (proj / "scratch").mkdir()
    (proj / "scratch" / "dump.bin").write_bytes(b"\0" * 1000)         # ignored
    (proj / "train.log").write_text("loss 0.1\n")                       # ignored
    (proj / ".env").write_text(f"S3_KEY={TOKEN}\n")                     # an ignored credential: no refusal
    plan = _plan(proj)
    try:
        staged = _staged(plan)
        assert "git's view" in plan.staged_from and "git's view" in plan.describe()
        assert "configs/extra.yaml" in staged and "gammaray/app/cli.py" in staged and "gammaray/app/job_entry.py" in staged
        assert not any(p.startswith(("scratch/", ".env", ".git/")) or p.endswith(".log") for p in staged)
        assert "configs/gone.yaml" not in staged
    finally:
        plan.cleanup()
    # the same folder without git: a walk with the default excludes, which does not read .gitignore
    (proj / ".env").unlink()
    subprocess.run(["rm", "-rf", str(proj / ".git")], check=True)
    plan = _plan(proj)
    try:
        staged = _staged(plan)
        assert "not a git checkout" in plan.staged_from
        assert "scratch/dump.bin" in staged and "train.log" in staged
    finally:
        plan.cleanup()


@pytest.mark.parametrize("git", [True, False], ids=["git", "walk"])
def test_a_symlink_out_of_the_project_is_not_followed(tmp_path, git):
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key = {TOKEN}\n")
    proj = _copy_project(tmp_path)
    (proj / "configs" / "s3.ini").symlink_to(home / ".aws" / "credentials")   # a harmless-looking name
    (proj / "aws").symlink_to(home / ".aws")                                   # a folder outside
    (proj / "configs" / "alias.yaml").symlink_to("demo.yaml")                  # inside: uploaded as a file
    if git:
        _git(proj, "init", "-q")
        _git(proj, "add", "-A")
    plan = _plan(proj)
    try:
        staged = _staged(plan)
        assert "configs/s3.ini" not in staged and not any(p.startswith("aws/") for p in staged)
        assert not any(TOKEN.encode() in data for data in staged.values())
        assert staged["configs/alias.yaml"] == (proj / "configs" / "demo.yaml").read_bytes()
        skipped = " | ".join(plan.skipped_files)
        assert "configs/s3.ini (a symlink to" in skipped and "aws (a symlink to" in skipped
        assert "outside the project" in skipped
    finally:
        plan.cleanup()


def test_a_symlink_to_an_ignored_credential_inside_the_project_is_refused(tmp_path):
    """.netrc is ignored by git, but a tracked link to it under a harmless name is not: its target's
    name counts."""
    proj = _copy_project(tmp_path)
    (proj / ".gitignore").write_text(".netrc\n")
    (proj / ".netrc").write_text(f"machine pypi.example.com login me password {TOKEN}\n")
    (proj / "configs" / "login").symlink_to("../.netrc")
    _git(proj, "init", "-q")
    with pytest.raises(SubmitError, match=r"configs/login: a netrc file \(login passwords\) \(by its name, via .netrc\)") \
            as err:
        _plan(proj)
    assert "add them to .gitignore" in str(err.value)


# ------------------------------------------------------------------------------------------------
# credential files


SA_KEY = json.dumps({"type": "service_account", "project_id": "p", "private_key_id": "abc",
                     "private_key": PEM, "client_email": "sa@p.iam.gserviceaccount.com"})
ADC = json.dumps({"type": "authorized_user", "client_id": "x.apps.googleusercontent.com",
                  "client_secret": "d-FL95Q19q7MQmFpd7hHD0Ty", "refresh_token": "1//0g" + TOKEN})
SA_NO_PEM = json.dumps({"type": "service_account", "project_id": "p", "client_email": "sa@p.iam.gserviceaccount.com"})
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
GH_TOKEN = "ghp_" + TOKEN * 2 + "abcd"
GH_PAT = "github_pat_" + TOKEN * 3
SLACK_TOKEN = "xoxb-" + "1234567890-" + TOKEN
KUBECONFIG = ("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: https://k8s:6443}\n"
              "users:\n- name: admin\n  user: {token: " + TOKEN + "}\n")


@pytest.mark.parametrize("rel,content,how", [
    ("id_rsa", PEM, "name"),
    ("deploy/id_ed25519_work", PEM, "name"),
    (".ssh/config", "Host gpu\n  IdentityFile ~/.ssh/key\n", "name"),
    (".netrc", f"machine pypi.example.com login me password {TOKEN}\n", "name"),
    ("kubeconfig", KUBECONFIG, "name"),
    (".kube/config", KUBECONFIG, "name"),
    ("configs/cluster-admin.yaml", KUBECONFIG, "content"),
    ("configs/gcp.json", SA_KEY, "content"),
    ("configs/adc.json", ADC, "content"),
    ("infra/terraform.tfstate", '{"version": 4, "resources": []}', "name"),
    (".env", f"S3_SECRET={TOKEN}\n", "name"),
    (".pypirc", f"[pypi]\nusername = __token__\npassword = pypi-{TOKEN}\n", "name"),
    ("credentials", f"[default]\naws_secret_access_key = {TOKEN}\n", "name"),
    ("configs/notes.txt", "the old deploy key:\n" + PEM, "content"),
    # by content whatever the file's name and format
    ("deploy/settings.ini", f"[default]\naws_access_key_id = AKIA{'Q' * 16}\naws_secret_access_key = {AWS_SECRET}\n",
     "content"),
    ("deploy/gh.toml", f'[auth]\ntoken = "{GH_TOKEN}"\n', "content"),
    ("deploy/ci.yaml", f"env:\n  GH: {GH_PAT}\n", "content"),
    ("deploy/notify.py", f'SLACK = "{SLACK_TOKEN}"\n', "content"),
    ("certs/server.pem", PEM, "content"),
    ("deploy/sa-key.txt", SA_NO_PEM, "content"),
    ("deploy/prod.env", f"DB_HOST=db\nexport DB_PASSWORD='{TOKEN}'\n", "content"),
])
def test_credential_files_are_refused_naming_the_file(tmp_path, rel, content, how):
    proj = _copy_project(tmp_path)
    (proj / rel).parent.mkdir(parents=True, exist_ok=True)
    (proj / rel).write_text(content)
    with pytest.raises(SubmitError) as err:
        _plan(proj)
    msg = str(err.value)
    assert "refusing to submit" in msg and f"{rel}: " in msg and f"(by its {how})" in msg
    assert ".gitignore" in msg and "--exclude" in msg and "--allow-file" in msg
    assert TOKEN not in msg and "OPENSSH PRIVATE KEY" not in msg
    # the ways out the message names: leave it out, or say it holds no secret
    _plan(proj, excludes=[rel]).cleanup()
    plan = _plan(proj, allow_files=[rel])
    try:
        assert _staged(plan)[rel] == content.encode()
    finally:
        plan.cleanup()


def test_a_token_across_a_chunk_edge_is_found_and_big_files_are_streamed_or_refused(tmp_path):
    """Files are checked while copied, a chunk at a time: a token cut by a chunk edge is still
    found, a large file costs no more memory than a chunk, and a file over --max-file-mb is refused
    naming it."""
    import tracemalloc

    from infra.credentials import CHUNK

    proj = _copy_project(tmp_path)
    edge = b"x" * (CHUNK - 11) + b" " + GH_TOKEN.encode() + b"\n" + b"y" * 1000
    (proj / "configs" / "blob.txt").write_bytes(edge)
    with pytest.raises(SubmitError, match=r"configs/blob.txt: a GitHub token \(by its content\)"):
        _plan(proj)
    (proj / "configs" / "blob.txt").unlink()
    big = proj / "configs" / "big.bin"
    with open(big, "wb") as f:
        f.truncate(40 << 20)  # 40 MB of zeros
    tracemalloc.start()
    try:
        plan = _plan(proj, max_file_mb=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert os.path.getsize(os.path.join(plan.working_dir, "configs", "big.bin")) == 40 << 20
    finally:
        plan.cleanup()
    assert peak < 8 * CHUNK, f"staging held {peak / 2**20:.0f} MB at once"  # a main-branch run read it whole
    with pytest.raises(SubmitError) as err:
        _plan(proj, max_file_mb=16)
    assert "configs/big.bin (40.0 MB)" in str(err.value) and "--max-file-mb=16" in str(err.value)


def test_public_keys_and_env_templates_are_not_credentials(tmp_path):
    proj = _copy_project(tmp_path)
    (proj / "id_rsa.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI me@host\n")
    (proj / ".env.example").write_text("S3_SECRET=\n")
    (proj / "configs" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (proj / "configs" / "keys.json").write_text('{"type": "tokenizer", "vocab": {"a": 1}}')
    plan = _plan(proj)
    try:
        assert {"id_rsa.pub", ".env.example", "configs/ca.pem", "configs/keys.json"} <= set(_staged(plan))
    finally:
        plan.cleanup()


# ------------------------------------------------------------------------------------------------
# URLs with credentials


def test_requirement_and_env_urls_with_credentials_are_refused(tmp_path):
    proj = _copy_project(tmp_path)
    req = tmp_path / "requirements.txt"
    req.write_text("numpy>=1.26\n--extra-index-url https://alice:pw-5f3a9c1e77@pypi.example.com/simple\n")
    with pytest.raises(SubmitError) as err:
        _plan(proj, requirements=str(req))
    msg = str(err.value)
    assert f"--requirements {req} line 2: https://alice:***@pypi.example.com" in msg and "pw-5f3a9c1e77" not in msg
    assert "${PIP_USER}" in msg  # says how to do it instead
    req.write_text(f"mypkg @ git+https://ghp_{TOKEN}@github.com/org/mypkg\n")  # a token as the user name
    with pytest.raises(SubmitError, match=r"line 1: git\+https://\*\*\*@github.com") as err:
        _plan(proj, requirements=str(req))
    assert TOKEN not in str(err.value)
    with pytest.raises(SubmitError, match=r"--env PIP_INDEX_URL: https://u:\*\*\*@pypi.example.com"):
        _plan(proj, env=parse_env(["PIP_INDEX_URL=https://u:hunter2hunter2@pypi.example.com/simple"]))
    # references expanded on the nodes, and ssh user names, are fine
    lines = ["--extra-index-url https://${PIP_USER}:${PIP_TOKEN}@pypi.example.com/simple",
             "mypkg @ git+ssh://git@github.com/org/mypkg"]
    req.write_text("\n".join(lines) + "\n")
    plan = _plan(proj, requirements=str(req))
    try:
        assert plan.runtime_env["pip"]["packages"] == lines
    finally:
        plan.cleanup()


# ------------------------------------------------------------------------------------------------
# secret values under any name


@pytest.mark.parametrize("kind", ["unusual-name", "hex-token", "url-password", "job-set-secret-key-env"])
def test_secret_values_are_found_whatever_the_variable_is_called(tmp_path, monkeypatch, kind):
    proj = _copy_project(tmp_path)
    command = ["pretrain"]
    if kind == "unusual-name":
        monkeypatch.setenv("GR_BLOB", TOKEN)
        value, label = TOKEN, "$GR_BLOB (a secret-looking value)"
    elif kind == "hex-token":
        value = "9f8e7d6c5b4a3928" + "1706f5e4d3c2b1a0"
        monkeypatch.setenv("MY_S3", value)
        label = "$MY_S3 (a secret-looking value)"
    elif kind == "url-password":
        value = "pw-" + "7hQ2xyzzy"
        monkeypatch.setenv("DATABASE_URL", f"postgres://app:{value}@db:5432/app")
        label = "the credential in $DATABASE_URL's URL"
    else:  # a plain password, named by the job's own --set: only the config says it is the secret
        value = "hunter2" + "hunter2"
        monkeypatch.setenv("GR_S3_PW", value)
        command += ["--set", "storage.secret_key_env=GR_S3_PW"]
        label = "$GR_S3_PW"
    (proj / "configs" / "notes.txt").write_text(f"remember: {value}\n")
    with pytest.raises(SubmitError) as err:
        _plan(proj, command)
    msg = str(err.value)
    assert f"{label} in uploaded file configs/notes.txt" in msg and value not in msg


def test_identifiers_and_key_ids_do_not_block_a_submission(tmp_path, monkeypatch):
    """The other side of the value scan: a commit sha tagged onto the job, a CamelCase run name,
    and an access key id under a custom name (the local server's is the word "gammaray") pass."""
    proj = _copy_project(tmp_path)
    sha = "3f1c2b9a8d7e6f5a4b3c" + "2d1e0f9a8b7c6d5e4f3a"
    monkeypatch.setenv("GITHUB_SHA", sha)
    monkeypatch.setenv("JOB_NAME", "NightlyTraining2024")
    monkeypatch.setenv("GR_S3_KEY", "gammaray")
    plan = _plan(proj, ["pretrain", "--set", "storage.access_key_env=GR_S3_KEY"],
                 overrides=["run.name=NightlyTraining2024"], env=parse_env([f"GIT_COMMIT={sha}"]),
                 secret_refs=parse_secret_refs(["AWS_ACCESS_KEY_ID=GR_S3_KEY"]))
    plan.cleanup()
    assert plan.runtime_env["env_vars"]["GIT_COMMIT"] == sha


@pytest.mark.parametrize("value,secret", [
    ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", True),   # AWS's documented example secret key
    ("ghp_" + TOKEN + "Ab12", True),
    ("6c7ef5925de5283b1efba1b3451fe55c", True),
    ("edbf0b1c-1129-4960-9170-5ac3a1e0265e", True),
    ("NightlyTraining2024", False),
    ("python3.11-slim-bookworm", False),
    ("rayproject/ray:2.60.0-py311-gpu", False),
    ("/home/me/.cache/huggingface", False),
    ("https://pypi.org/simple", False),
    ("rs=0:di=01;34:ln=01;36", False),
    ("en_US.UTF-8", False),
])
def test_what_looks_like_a_secret(value, secret):
    assert looks_like_secret(value) is secret
