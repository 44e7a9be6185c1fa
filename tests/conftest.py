"""Shared fixtures: one real S3 server (SeaweedFS on 127.0.0.1) and one local Ray instance for the
whole session, plus a small prepared synthetic catalogue in that server.

Order matters: the S3 server exports AWS_* to this process before Ray starts, so every Ray worker
(Ray Data tasks, Ray Train workers) inherits the endpoint and credentials.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a GPU machine must not change CPU test behaviour
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3():
    from infra.s3server import SeaweedS3

    with SeaweedS3(bucket="gammaray-test") as server:
        yield server


@pytest.fixture(scope="session")
def ray_local(s3):
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: training workers take 0.5 each and Ray Data tasks
        # need room beside them (docs/design.md section 9: the silent deadlock)
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=True,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": _repo_root()}})
    yield ray
    ray.shutdown()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def small_catalogue(s3):
    """A prepared synthetic catalogue in S3: 384 train (+5 bad) and 96 held-out records, a tokenizer."""
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.synthetic import write_raw_catalogue
    from pipelines.tokenizer import build_for_catalogue

    with tempfile.TemporaryDirectory() as raw:
        paths = write_raw_catalogue(raw, n_train=384, n_val=96, seed=3, bad_records=5)
        opts = PrepareOptions(progress=False, max_records_per_shard=160, row_group_size=32)
        train = prepare(paths["train"], s3.url("small", "train"), opts)
        val = prepare(paths["val"], s3.url("small", "val"), opts)
        build_for_catalogue(s3.url("small", "train"), s3.url("small", "tokenizer"), train.manifest, vocab_size=500)
    return {"train": s3.url("small", "train"), "val": s3.url("small", "val"),
            "tokenizer": s3.url("small", "tokenizer"), "train_result": train, "val_result": val}


@pytest.fixture(scope="session")
def embedded_catalogue(ray_local, s3, small_catalogue, tmp_path_factory):
    """A checkpoint built without training (tests/eval_support.make_checkpoint), uploaded to S3, and the
    held-out catalogue embedded with it by `gammaray embed`: shared by the search and serve tests."""
    from pipelines import storage
    from tests.eval_support import make_checkpoint
    from workers.evaluation.embed import EmbedOptions, embed_catalogue

    root = tmp_path_factory.mktemp("embedded")
    local, cfg = make_checkpoint(str(root), small_catalogue)
    ckpt = s3.url("search-test", "ckpt")
    storage.upload_dir(local, ckpt)
    emb = s3.url("search-test", "emb")
    embed_catalogue(ckpt, small_catalogue["val"], emb,
                    EmbedOptions(batch_size=48, actors=1, cpus_per_actor=0.5, progress=False))
    return {"checkpoint": ckpt, "checkpoint_local": local, "embeddings": emb, "root": str(root), "cfg": cfg}


def tiny_overrides(catalogue: dict, run_storage: str, name: str) -> dict:
    """Config overrides for fast tests: a very small model, few steps."""
    return {
        "data.train": catalogue["train"], "data.val": catalogue["val"], "data.tokenizer": catalogue["tokenizer"],
        "run.storage": run_storage, "run.name": name,
        "model.embed_dim": 32,
        "model.image.hf_config": {"model_type": "vit", "image_size": 64, "patch_size": 16, "hidden_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        "model.text.hf_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64},
        "train.epochs": 1, "train.log_every": 5, "train.checkpoint_every": 1000,
    }


def file_rendezvous(folder: str, name: str) -> str:
    """init_method for a spawned torch.distributed group: a file store, never a port picked free and
    bound later, which another process of the suite (Ray starts servers on random ports) can take."""
    return "file://" + os.path.join(folder, f"rendezvous-{name}")


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
