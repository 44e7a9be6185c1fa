"""`gammaray bench scaling` (bytes per step counted on the real collectives) and the GPU check
script's logic, rehearsed on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.embed_dim=32",
        "--set", "model.image.hf_config={model_type: vit, image_size: 64, patch_size: 16, hidden_size: 32, "
                 "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
        "--set", "model.text.hf_config={model_type: bert, hidden_size: 32, num_hidden_layers: 1, "
                 "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"]


@pytest.mark.timeout(600)
def test_bench_scaling_counts_loss_traffic(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "gammaray.app.cli", "bench", "scaling", "--workers", "2", "--steps", "2",
                           "--warmup", "1", "--batch-size", "16", "--vocab-size", "300", "--json", str(out),
                           "--profile", str(tmp_path / "prof"), *TINY],
                          capture_output=True, text=True, env=env, timeout=580, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["loss"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"infonce", "gamma"}
    for r in rows.values():
        assert {"loss", "workers", "batch_size", "step_time_s", "samples_per_s", "bytes_per_step"} <= r.keys()
        assert r["workers"] == 2 and r["batch_size"] == 16 and r["step_time_s"] > 0
        assert r["samples_per_s"] == pytest.approx(32 / r["step_time_s"], rel=1e-3)
        assert r["bytes_per_step"] == r["loss_bytes_per_step"] + r["grad_bytes_per_step"] + r["param_bytes_per_step"]
        # the text tower's embedding table follows --vocab-size; GPU memory is only measured with --gpu
        assert r["vocab_size"] == 300 and r["peak_gpu_mb"] is None and r["device"] == "cpu"
    assert rows["gamma"]["params"] == rows["infonce"]["params"]
    assert all(r["rows_in_process"] == 2 for r in rows.values())  # on CPU both losses share the processes
    # --profile: rank 0's operator table per row, with the phases of the step labelled (the shared train_step's)
    for loss in rows:
        assert rows[loss]["profiled"] is True
        text = (tmp_path / f"prof-{loss}-b16-z1.txt").read_text()
        assert all(f"step/{p}" in text for p in ("forward", "loss", "backward", "optimizer")), text[:2000]
        assert ("step/memory_exchange" in text) == (loss == "gamma"), text[:2000]
    B, D, W = 16, 32, 2
    # InfoNCE: all-gathers image and text embeddings (B x D float32 each, plus the batch sizes), and in
    # backward (gloo has no reduce-scatter) all-reduces the whole gathered gradient (W x B x D float32)
    assert rows["infonce"]["loss_bytes_per_step"] == 2 * (8 + B * D * 4) + 2 * W * B * D * 4
    # gamma: one fixed-size exchange for both directions (K = 2 channels; no counts, no host read): a block
    # of B rows for each of the W owners, (index, log Z per channel) as float64 (W x B x (1 + K)), and the
    # updated rates back (W x B x K x float64; with loss.gamma.track_age, off by default, one more
    # column: the entry's last-update step)
    K = 2
    assert rows["gamma"]["loss_bytes_per_step"] == 8 * W * B * (1 + K) + 8 * W * B * K
    # the gradient traffic depends on the model only
    assert rows["infonce"]["grad_bytes_per_step"] == rows["gamma"]["grad_bytes_per_step"] > 0
    assert "infonce" in proc.stdout and "bytes/step" in proc.stdout


@pytest.mark.timeout(300)
def test_bench_scaling_process_per_row_gives_each_loss_its_own_processes(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "gammaray.app.cli", "bench", "scaling", "--workers", "1", "--steps", "1",
                           "--warmup", "1", "--batch-size", "4", "--process-per-row", "--json", str(out), *TINY],
                          capture_output=True, text=True, env=env, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["loss"] for r in rows] == ["infonce", "gamma"]
    assert all(r["rows_in_process"] == 1 and r["workers"] == 1 for r in rows)


@pytest.mark.timeout(900)
def test_gpu_check_logic_on_cpu(ray_local, tmp_path):
    """The GPU check script end to end with --cpu: its own local catalogue (no S3), bf16 ZeRO-3
    (export through GatheredParameters, bf16 BatchNorm buffers of a ResNet tower), JSON results."""
    from gammaray.app.benchmarks import gpu_check

    out = tmp_path / "gpu.json"
    rc = gpu_check.main(["--cpu", "--tiny", "--stages", "3", "--n-train", "96", "--n-val", "32", "--batch-size", "16",
                         "--epochs", "1", "--workdir", str(tmp_path / "work"), "--json", str(out),
                         "--set", "data.image_size=32"])
    res = json.loads(out.read_text())
    assert rc == 0, res
    (run,) = res["runs"]
    assert run["run"] == "zero3-bf16" and run["ok"] and run["steps"] == 6 and run["samples_seen"] == 96
    assert run["checkpoint_has"] == {"portable": True, "model_heads": True, "loss_state": True,
                                     "deepspeed_files": run["checkpoint_has"]["deepspeed_files"]}
    assert run["checkpoint_has"]["deepspeed_files"] >= 2
    assert 0.0 <= run["val_r_at_1"] <= 1.0 and run["samples_per_s"] > 0


@pytest.mark.timeout(300)
def test_bench_step_rows_and_host_sync_counter():
    """`gammaray bench step` at a tiny size: one row per (impl, regime, loss, batch) with the documented
    fields, gammaray's step counted at 0 host reads, and the counter counts a planted `.item()`."""
    import argparse

    import torch

    from gammaray.app.benchmarks import step as bench_step
    from gammaray.config import GammarayConfig, apply_overrides

    cfg = apply_overrides(GammarayConfig(), {"data.image_size": 32, "data.max_text_tokens": 8})
    args = argparse.Namespace(warmup=1, steps=2, repeats=1, peak_tflops=50.0, config_name="tiny", clock="cpu",
                              min_window_s=0.0)
    rows = bench_step.measure_row(cfg, "towers", ["gamma"], 4, ["gammaray", "reference"], args, torch.device("cpu"))
    # heads: both losses alternate in one row group, each window at least --min-window-s long (more steps)
    args.min_window_s = 0.05
    heads = bench_step.measure_row(cfg, "heads", ["infonce", "gamma"], 4, ["gammaray", "reference"], args,
                                   torch.device("cpu"))
    assert {r["loss"] for r in heads} == {"infonce", "gamma"} and len({r["window_steps"] for r in heads}) == 1
    assert heads[0]["window_steps"] > args.steps and heads[0]["window_steps"] * heads[0]["step_s"] >= 0.02
    rows += [r for r in heads if r["loss"] == "gamma"]
    keys = {"device", "config", "impl", "regime", "loss", "batch_size", "step_s", "samples_per_s", "host_syncs_per_step",
            "flops_per_sample", "tflops", "peak_fraction", "peak_mem_mb", "window_steps"}
    assert len(rows) == 4 and {(r["impl"], r["regime"]) for r in rows} == {
        (i, g) for i in ("gammaray", "reference") for g in ("towers", "heads")}
    for r in rows:
        assert keys <= r.keys(), keys - r.keys()
        assert r["batch_size"] == 4 and r["step_s"] > 0 and r["samples_per_s"] == pytest.approx(4 / r["step_s"], rel=1e-3)
        assert r["device"].endswith(", CPU time)")  # --clock cpu: the row says which clock timed it
        assert r["flops_per_sample"] > 0
        assert r["tflops"] == pytest.approx(r["flops_per_sample"] * 4 / r["step_s"] / 1e12, rel=1e-2)
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / 50.0, rel=1e-2)
    gammaray = [r for r in rows if r["impl"] == "gammaray"]
    assert all(r["host_syncs_per_step"] == 0 for r in gammaray), [r["sync_sites"] for r in gammaray]
    assert "|" in bench_step.table(rows) and len(bench_step.ratios(rows)) == 2

    counter = bench_step.SyncCounter(cuda=False)
    t = torch.ones(3)
    with counter.active():
        t.sum().item()
        int(t[0])
        torch.optim.SGD([torch.nn.Parameter(t.clone())], lr=0.1)  # torch.optim's host-side counters are not counted
    assert counter.count == 2
    t.sum().item()
    assert counter.count == 2  # uninstalled after the window
