"""What a run leaves behind and reports, on the real stack (Ray Train V2 + DeepSpeed over gloo,
SeaweedFS S3, Ray Data): final metrics that describe the whole run, no temporary folder left after a
run, an evaluation or a failed run, checkpoint files that are data (a planted pickle is refused and
never runs), and a resume that checks the checkpoint was trained under the same catalogue, seed and
plan settings.

The catalogue has 65 records, so each epoch's plan gives the two workers 32 and 33 records: with
micro-batches of 16, rank 1's last micro-batch holds a single record (no in-batch negative) while
rank 0 takes that step with a zero-weight stand-in. A main-branch run reported rank 0's figures of one
micro-batch: records_trained 64 of 130, gamma/anchors_without_negatives 0.0 here (1.0 in the issue).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from gammaray.config import GammarayConfig, apply_overrides
from pipelines import storage
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ODD, EPOCHS = 65, 2
FULL_DISK_SIZE = "3m"  # about two checkpoints of the tiny model on 2 workers (measured: ~1.2 MB each)


@pytest.fixture(scope="module")
def odd_catalogue(s3, small_catalogue):
    """65 prepared records (row groups of 16) in S3; the tokenizer and held-out part of small_catalogue."""
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.synthetic import write_raw_catalogue

    train = s3.url("runtime", "odd", "train")
    with tempfile.TemporaryDirectory() as raw:
        paths = write_raw_catalogue(raw, n_train=N_ODD, n_val=0, seed=5, bad_records=0)
        res = prepare(paths["train"], train, PrepareOptions(progress=False, row_group_size=16))
    assert res.manifest["num_records"] == N_ODD
    return {**small_catalogue, "train": train}


def odd_overrides(cat: dict, run_storage: str, name: str, **extra) -> dict:
    o = tiny_overrides(cat, run_storage, name)
    o.update({"data.val": None, "data.batch_size": 16, "train.workers": 2, "train.epochs": EPOCHS,
              "data.preprocess_concurrency": 1, "train.log_every": 2})
    o.update(extra)
    return o


def as_set_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


# --------------------------------------------------------------------------------------------
# a user's session in its own process and temporary directory: pretrain, eval, a refused resume


DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray
    root, address, phases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    tmp = os.environ["TMPDIR"]
    # this job's Ray workers (train workers, the controller, Ray Data tasks) use the same TMPDIR
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": root, "DS_ACCELERATOR": "cpu", "TMPDIR": tmp}})
    from gammaray.app.cli import main
    from tests.test_distributed_runtime import plant_linked_state, plant_payload

    def left():
        return sorted(n for n in os.listdir(tmp) if n.startswith("gammaray"))

    out, checkpoint = {"start": left()}, None
    for name, argv in phases:
        if name.startswith("plant"):
            {"plant": plant_payload, "plant-link": plant_linked_state}[name](checkpoint, **argv)
            continue
        code = main([a.replace("{checkpoint}", checkpoint or "") for a in argv])
        if name == "pretrain":
            checkpoint = json.load(open(argv[argv.index("--json") + 1]))["checkpoint"]
        out[name] = {"code": code, "left": left()}
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    os._exit(0)
""")


def plant_payload(checkpoint: str, dst: str, file: str, marker: str) -> None:
    """Copy a checkpoint to `dst` with `file` replaced by a pickle whose loading would write `marker`."""
    import io

    import torch

    class Payload:
        def __reduce__(self):
            return exec, (f"open({marker!r}, 'w').write('the checkpoint ran code')",)

    for f in storage.list_files(checkpoint):
        storage.write_bytes(storage.join(dst, f[len(checkpoint):]), storage.read_bytes(f))
    buf = io.BytesIO()
    torch.save({"gamma": Payload()}, buf)
    storage.write_bytes(storage.join(dst, file), buf.getvalue())


def plant_linked_state(checkpoint: str, dst: str, marker: str) -> None:
    """A local copy of a checkpoint whose deepspeed/state folder is a symbolic link to a folder
    elsewhere holding a DeepSpeed model file that is a payload (DeepSpeed follows the link; a main-branch
    check, walking with os.walk, did not)."""
    import shutil

    import torch

    class Payload:
        def __reduce__(self):
            return exec, (f"open({marker!r}, 'w').write('the linked folder ran code')",)

    storage.download_dir(checkpoint, dst)
    elsewhere = dst + "-elsewhere"
    os.makedirs(elsewhere)
    torch.save({"module": Payload()}, os.path.join(elsewhere, "mp_rank_00_model_states.pt"))
    shutil.rmtree(os.path.join(dst, "deepspeed", "state"))
    os.symlink(elsewhere, os.path.join(dst, "deepspeed", "state"))


@pytest.fixture(scope="module")
def session(ray_local, s3, odd_catalogue, tmp_path_factory):
    """One process, its own TMPDIR (for itself and its Ray workers), running the CLI."""
    work = tmp_path_factory.mktemp("runtime-session")
    tmp = work / "tmp"
    tmp.mkdir()
    run_storage = s3.url("runtime", "runs")
    over = odd_overrides(odd_catalogue, run_storage, "odd", **{"data.val": odd_catalogue["val"]})
    marker = str(work / "payload-ran")
    planted = s3.url("runtime", "planted")
    refused = odd_overrides(odd_catalogue, run_storage, "from-planted",
                            **{"train.resume_from": planted, "train.max_failures": 0})
    linked, link_marker = str(work / "linked"), str(work / "linked-payload-ran")
    refused_link = odd_overrides(odd_catalogue, run_storage, "from-linked",
                                 **{"train.resume_from": linked, "train.max_failures": 0})
    phases = [
        ["pretrain", ["pretrain", "--quiet", "--json", str(work / "pretrain.json"), *as_set_args(over)]],
        ["eval", ["eval", "--checkpoint", "{checkpoint}", "--data", odd_catalogue["val"], "--json", str(work / "eval.json")]],
        ["plant", {"dst": planted, "file": "rank-00000/loss_state.pt", "marker": marker}],
        ["refused", ["pretrain", "--quiet", "--json", str(work / "refused.json"), *as_set_args(refused)]],
        ["plant-link", {"dst": linked, "marker": link_marker}],
        ["refused-link", ["pretrain", "--quiet", *as_set_args(refused_link)]],
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", TMPDIR=str(tmp))
    proc = subprocess.run([sys.executable, "-c", DRIVER, ROOT, ray_local.get_runtime_context().gcs_address,
                           json.dumps(phases)], capture_output=True, text=True, env=env, timeout=1200)
    assert "RESULT " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    return {"out": out, "stderr": proc.stderr, "work": work, "marker": marker, "planted": planted,
            "linked": linked, "link_marker": link_marker,
            "metrics": json.loads((work / "pretrain.json").read_text()), "run_uri": storage.join(run_storage, "odd")}


@pytest.mark.timeout(1500)
def test_final_metrics_are_the_runs_not_one_ranks(session):
    m, out = session["metrics"], session["out"]
    assert out["pretrain"]["code"] == 0
    assert m["step"] == EPOCHS * 3  # ceil(33 / 16) micro-batches per epoch: the last one of rank 0 is a stand-in
    # counts summed over both workers (a main-branch run reported rank 0's 64)
    assert m["records_trained"] == m["samples_seen_total"] == N_ODD * EPOCHS
    # loss terms: the mean over the last epoch's 65 records of both ranks, not the last micro-batch:
    # of those 65 anchors only the single-record micro-batch's one has no in-batch negative
    assert m["loss_epoch"] == EPOCHS - 1 and m["loss_records"] == N_ODD
    assert m["gamma/anchors_without_negatives"] == pytest.approx(1 / N_ODD)
    for key in ("loss", "contrastive_loss", "gamma/log_rate_mean", "gamma/weight_mean"):
        assert m[key] == m[key] and m[key] != 0.0, key
    assert m["loss"] == pytest.approx(m["contrastive_loss"])
    # the metrics file's final line (aggregated by the callback from every worker) says the same
    lines = [json.loads(x) for x in storage.read_bytes(storage.join(session["run_uri"], "metrics.jsonl")).decode().splitlines()]
    final = lines[-1]
    assert final["final"] == 1 and final["workers"] == 2
    for key in ("records_trained", "loss", "contrastive_loss", "gamma/anchors_without_negatives", "loss_records"):
        assert final[key] == pytest.approx(m[key]), key
    # periodic lines still sum the workers' running counts
    assert [ln["records_trained"] for ln in lines if not ln.get("final")][-1] == N_ODD * EPOCHS


@pytest.mark.timeout(1500)
def test_no_temporary_folder_is_left_after_a_run_an_eval_or_a_failed_run(session):
    out = session["out"]
    assert out["start"] == []
    assert out["pretrain"] == {"code": 0, "left": []}   # driver, controller, 2 workers, Ray Data tasks
    assert out["eval"] == {"code": 0, "left": []}       # the model copy and the tokenizer copies
    assert out["refused"]["code"] == 1 and out["refused"]["left"] == []
    assert out["refused-link"]["code"] == 1 and out["refused-link"]["left"] == []


@pytest.mark.timeout(1500)
def test_a_planted_pickle_is_refused_naming_the_file_and_never_runs(session):
    assert session["out"]["refused"]["code"] == 1
    assert not os.path.exists(session["marker"]), "the planted payload ran"
    err = session["stderr"]
    assert f"{session['planted']}/rank-00000/loss_state.pt: refused to load: it references code" in err
    assert "exec" in err and "start a new run" in err


@pytest.mark.timeout(1500)
def test_a_checkpoint_folder_linked_elsewhere_is_refused_and_never_runs(session, tmp_path):
    """A local checkpoint whose deepspeed/state is a symbolic link to a folder holding a payload:
    resuming from it is refused naming the link, and the payload never runs (a main-branch resume ran
    it: DeepSpeed follows the link, the check walked past it)."""
    assert session["out"]["refused-link"]["code"] == 1
    assert not os.path.exists(session["link_marker"]), "the payload behind the link ran"
    assert f"{session['linked']}/deepspeed/state: refused to load: it is a symbolic link" in session["stderr"]
    # the check on its own: a link anywhere in a checkpoint (file or folder) is refused, before any load
    from workers.safe_load import UnsafeCheckpoint, check_deepspeed_files, check_no_links

    (tmp_path / "ckpt" / "rank-00000").mkdir(parents=True)
    (tmp_path / "elsewhere.pt").write_bytes(b"x")
    (tmp_path / "ckpt" / "rank-00000" / "loss_state.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"ckpt/rank-00000/loss_state.pt: refused to load: it is a symbolic link"):
        check_no_links(str(tmp_path / "ckpt"), "ckpt")
    (tmp_path / "ds").symlink_to(tmp_path / "ckpt")
    with pytest.raises(UnsafeCheckpoint, match=r"ckpt/deepspeed: refused to load: it is a symbolic link"):
        check_deepspeed_files(str(tmp_path / "ds"), "ckpt/deepspeed")


@pytest.mark.timeout(600)
def test_deepspeed_files_are_checked_before_deepspeed_unpickles_them(session, tmp_path):
    """DeepSpeed 0.19 loads its own files with weights_only=False: the real files of a 2-worker ZeRO-1
    checkpoint pass the static check, the same folder with one planted file does not."""
    import torch

    from workers.safe_load import UnsafeCheckpoint, check_deepspeed_files

    ckpt = session["metrics"]["checkpoint"]
    storage.download_dir(storage.join(ckpt, "deepspeed"), str(tmp_path))
    files = sorted(p.name for p in tmp_path.rglob("*.pt"))
    assert "mp_rank_00_model_states.pt" in files and any("optim_states" in f for f in files)
    check_deepspeed_files(str(tmp_path), "ckpt/deepspeed")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    target = next(tmp_path.rglob("mp_rank_00_model_states.pt"))
    sd = torch.load(target, weights_only=False)  # the real file, trusted here
    sd["extra"] = Payload()
    torch.save(sd, target)
    with pytest.raises(UnsafeCheckpoint, match=r"ckpt/deepspeed/state/mp_rank_00_model_states.pt: refused .*system"):
        check_deepspeed_files(str(tmp_path), "ckpt/deepspeed")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# resume verifies its surroundings


@pytest.mark.timeout(1200)
def test_resume_refuses_another_seed_and_force_resumes(ray_local, s3, odd_catalogue, tmp_path, capsys):
    from workers.training.resume import ResumeMismatch
    from workers.training.trainer import pretrain

    over = odd_overrides(odd_catalogue, s3.url("runtime", "runs"), "seeded", **{"train.max_steps": 2})
    first = pretrain(apply_overrides(GammarayConfig(), over), progress=False)
    assert first.metrics["step"] == 2

    other_seed = apply_overrides(GammarayConfig(), {**over, "run.seed": 1, "train.max_steps": 4})
    # refused in the driver, before Ray is asked for anything
    with pytest.raises(ResumeMismatch, match=r"cannot resume from s3://.*/seeded/checkpoint_.*: run.seed was 0, now 1\. "
                                             r".*another run.name.*--force \(train.resume_force=true\)"):
        pretrain(other_seed, progress=False)
    # ... and by the training loop, against the checkpoint it loads (a Tune trial builds its trainer
    # directly): run here in a world of one, as a Ray Train worker runs it (a refused fit costs ~25 s)
    from workers.training.loop import train_loop_per_worker

    resume = apply_overrides(other_seed, {"train.resume_from": first.checkpoint_uri})
    with pytest.raises(ResumeMismatch, match=r"run\.seed was 0, now 1"):
        train_loop_per_worker({"config": resume.model_dump(mode="json"), "store": storage.Store.of(resume.storage),
                               "in_ray": False})

    # a checkpoint folder whose save never finished (a full disk, a killed driver): named later than
    # the real one, with an empty state file and never registered by Ray Train. A main-branch resume
    # picked it as the newest and stopped with "Expecting value: line 1 column 1 (char 0)"
    partial = storage.join(over["run.storage"], "seeded", "checkpoint_9999-12-31_23-59-59.999999")
    storage.write_bytes(storage.join(partial, "rank-00000", "train_state.json"), b"")
    storage.write_bytes(storage.join(partial, "portable.pt"), b"\x80\x02")

    # resumed anyway with the CLI's --force (train.resume_force)
    from gammaray.app.cli import main

    out = tmp_path / "forced.json"
    capsys.readouterr()
    assert main(["pretrain", "--force", "--quiet", "--json", str(out),
                 *as_set_args({**over, "run.seed": 1, "train.max_steps": 4})]) == 0
    assert f"{partial}: skipped: Ray Train never registered this checkpoint" in capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["resumed_from_steps"] == [2] and m["step"] == 4  # from the last complete checkpoint
    state = json.loads(storage.read_bytes(storage.join(m["checkpoint"], "rank-00000", "train_state.json")))
    assert state["resumes"][-1]["forced"] == ["run.seed was 0, now 1"]
    assert state["identity"]["run.seed"] == 1  # the run goes on under the new settings


def test_identity_names_catalogue_plan_and_auto_batch(odd_catalogue, s3):
    from pipelines.prepare import load_manifest
    from workers.training.resume import check_identity, differences, run_identity

    cfg = apply_overrides(GammarayConfig(), odd_overrides(odd_catalogue, s3.url("runtime", "runs"), "x"))
    manifest = load_manifest(odd_catalogue["train"])
    base = run_identity(cfg, manifest)
    grown = {**manifest, "num_records": 70, "shards": manifest["shards"] + [{**manifest["shards"][0], "path": "shards/new"}]}
    assert differences(base, run_identity(cfg, grown)) == [
        f"the catalogue (data.train) differs: the checkpoint's had 65 records (sha256 {base['catalogue_sha256'][:12]}), "
        f"this one has 70 (sha256 {run_identity(cfg, grown)['catalogue_sha256'][:12]})"]
    for key, value in (("run.seed", 7), ("data.shuffle", False), ("data.batch_size", 8),
                       ("train.gradient_accumulation_steps", 2)):
        assert differences(base, run_identity(apply_overrides(cfg, {key: value}), manifest)) == [
            f"{key} was {base[key]!r}, now {value!r}"]
    # allowed to change on resume: the worker count (parts are re-cut), the epochs, max_steps
    same = apply_overrides(cfg, {"train.workers": 3, "train.epochs": 9, "train.max_steps": 100})
    assert differences(base, run_identity(same, manifest)) == []
    # batch_size=auto is compared as written, so a resume on another cluster size keeps it
    auto = run_identity(apply_overrides(cfg, {"data.batch_size": "auto"}), manifest)
    assert auto["data.batch_size"] == "auto" and auto["ray.auto.global_batch_size"] == 64
    assert check_identity(None, base, cfg, "old") == []  # a checkpoint from before identities: not checkable
    assert check_identity(base, auto, apply_overrides(cfg, {"train.resume_force": True}), "old") == [
        "data.batch_size was 16, now 'auto'", "ray.auto.global_batch_size was None, now 64"]


# --------------------------------------------------------------------------------------------
# a full disk


def _mount_tmpfs(path, size: str) -> bool:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.timeout(1200)
def test_full_run_storage_is_one_line_and_the_same_command_resumes(ray_local, odd_catalogue, tmp_path, capsys):
    """The run storage is a small tmpfs that fills up at the second checkpoint: pretrain stops with
    one line, "storage full at PATH", and leaves a partial checkpoint folder. After space is freed
    (the tmpfs grown), the same command resumes from the last complete checkpoint and finishes (a
    main-branch run printed Ray's traceback, then every re-run stopped on the partial folder's
    empty state file: the run could neither resume nor restart)."""
    from gammaray.app.cli import main

    disk = tmp_path / "small-disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, FULL_DISK_SIZE):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        over = odd_overrides(odd_catalogue, str(disk), "full", **{
            "data.val": None, "train.checkpoint_every": 1, "train.max_steps": 4, "train.keep_checkpoints": 4,
            "train.max_failures": 0, "train.portable_checkpoint": False})
        argv = ["pretrain", "--quiet", "--json", str(tmp_path / "full.json"), *as_set_args(over)]
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        line = next(ln for ln in err.splitlines() if ln.startswith("gammaray pretrain: "))
        assert f"storage full at {disk}" in line and "run the same command again" in line, err[-3000:]
        # no traceback of the command itself (Ray's workers and controller log theirs, prefixed "(pid=...)")
        assert not any(ln.startswith("Traceback") for ln in err.splitlines()), err[-3000:]
        run = disk / "full"
        done = sorted(p.name for p in run.glob("checkpoint_*") if (p / "rank-00001" / "train_state.json").exists())
        assert 1 <= len(done) < 4, sorted(os.listdir(run))
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        assert main(argv) == 0
        m = json.loads((tmp_path / "full.json").read_text())
        assert m["step"] == 4 and len(m["resumed_from_steps"]) == 1 and 1 <= m["resumed_from_steps"][0] < 4
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
