"""The distribution a user installs: the wheel built from this tree, installed on its own (no repo on the
path, no editable install), runs `gammaray demo --help` and one small pretrain. Its top-level packages
are exactly the repository's (docs/design.md, "Packaging": why they are not under one namespace)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.foundation
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = {"gammaray", "pipelines", "workers", "tuning", "infra"}


def _tracked_copy(dst: str) -> None:
    """The tracked files of the working tree: what a clone builds from (no .venv, no build leftovers)."""
    files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


@pytest.mark.timeout(600)
def test_the_wheel_installed_alone_runs_the_cli_and_a_small_pretrain(tmp_path):
    src, dist, site, work = (tmp_path / d for d in ("src", "dist", "site", "work"))
    _tracked_copy(str(src))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("gammaray-*.whl")
    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {n for n in names if not n.endswith(".dist-info")} == TOP_LEVEL
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    # the installed copy only: its folder first on the path, run from a folder outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(site), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")

    def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=work,
                              timeout=timeout)

    where = run("-c", "import gammaray, pipelines, workers, tuning, infra; "
                      "print(*(m.__file__ for m in (gammaray, pipelines, workers, tuning, infra)))")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout
    helped = run("-m", "gammaray.app.cli", "demo", "--help")
    assert helped.returncode == 0 and "demo" in helped.stdout, helped.stderr[-2000:]

    made = run("-c", "from pipelines.synthetic import write_raw_catalogue; import json; "
                     "print(json.dumps(write_raw_catalogue('raw', n_train=48, n_val=16, seed=1)))")
    assert made.returncode == 0, made.stderr[-2000:]
    raw = json.loads(made.stdout.strip().splitlines()[-1])
    for split in ("train", "val"):
        prep = run("-m", "gammaray.app.cli", "prepare", raw[split], f"catalog/{split}", "--row-group-size", "16",
                   *(["--build-tokenizer", "300"] if split == "train" else []))
        assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    tiny = {"model.embed_dim": 16,
            "model.image.hf_config": {"model_type": "vit", "image_size": 64, "patch_size": 16, "hidden_size": 16,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
            "model.text.hf_config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "intermediate_size": 32,
                                     "max_position_embeddings": 64},
            "data.train": "catalog/train", "data.val": "catalog/val", "data.batch_size": 16,
            "train.workers": 0, "train.max_steps": 2, "run.storage": "runs", "run.name": "wheel",
            "ray.num_cpus": 2, "data.preprocess_concurrency": 1}
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    trained = run("-m", "gammaray.app.cli", "pretrain", "--quiet", *sets, timeout=500)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    state = json.loads((work / "runs" / "wheel" / "local-checkpoint" / "rank-00000" / "train_state.json").read_text())
    assert state["step"] == 2 and state["records_trained"] == 32
