"""GPU path check: `pretrain` with train.use_gpu=true, 1 worker, bf16, DeepSpeed ZeRO-2 and ZeRO-3.

Self-contained for a machine with no network and no S3 server: it writes a synthetic catalogue to a
local folder, prepares it, trains a tokenizer, starts a local Ray, and runs one short `pretrain` per
strategy (the default model: a small ResNet image tower, whose BatchNorm exercises bf16 buffers,
and a small BERT), then checks the final checkpoint (DeepSpeed files, portable optimizer state, loss
state, the exported model: under ZeRO-3 it is gathered with GatheredParameters).

  python -m gammaray.app.benchmarks.gpu_check --json gpu_check.json            # on the GPU machine
  python -m gammaray.app.benchmarks.gpu_check --cpu --stages 3 --json x.json   # the same logic on CPU

Prints and writes, per run: step time, samples/s, peak GPU memory, final held-out R@1, and what
the checkpoint holds. Exit status 0 only if every run finished and its numbers are finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, metavar="PATH", help="write the results here")
    p.add_argument("--workdir", default=None, help="folder for the catalogue and runs (default: a temp dir)")
    p.add_argument("--stages", default="2,3", help="ZeRO stages to run, comma-separated (default 2,3)")
    p.add_argument("--ddp", action="store_true", help="also run train.strategy=ddp (bf16 autocast)")
    p.add_argument("--n-train", type=int, default=2048, help="synthetic training records (default 2048)")
    p.add_argument("--n-val", type=int, default=256, help="held-out records (default 256)")
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch (default 64)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    p.add_argument("--cpu", action="store_true", help="run the same logic on CPU (tests; bf16 on CPU)")
    p.add_argument("--tiny", action="store_true", help="a very small model (tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="extra config overrides for every run")
    return p.parse_args(argv)


TINY = {
    "model.embed_dim": 32,
    "model.image.hf_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                              "depths": [1, 1], "layer_type": "basic"},
    "model.text.hf_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64},
}


def make_catalogue(root: str, n_train: int, n_val: int) -> dict:
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.synthetic import write_raw_catalogue
    from pipelines.tokenizer import build_for_catalogue

    cat = os.path.join(root, "catalog")
    if not os.path.exists(os.path.join(cat, "tokenizer", "tokenizer_config.json")):
        paths = write_raw_catalogue(os.path.join(root, "raw"), n_train=n_train, n_val=n_val, seed=1)
        opts = PrepareOptions(progress=False, row_group_size=128)
        train = prepare(paths["train"], os.path.join(cat, "train"), opts)
        prepare(paths["val"], os.path.join(cat, "val"), opts)
        build_for_catalogue(os.path.join(cat, "train"), os.path.join(cat, "tokenizer"), train.manifest, vocab_size=1000)
    return {"train": os.path.join(cat, "train"), "val": os.path.join(cat, "val"), "tokenizer": os.path.join(cat, "tokenizer")}


def run_one(name: str, overrides: dict, root: str) -> dict:
    import torch

    from gammaray.config import GammarayConfig, apply_overrides
    from pipelines import storage
    from workers.training.trainer import pretrain

    cfg = apply_overrides(GammarayConfig(), overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = pretrain(cfg, progress=False)
    wall = time.perf_counter() - t0
    m = res.metrics
    lines = [json.loads(x) for x in storage.read_bytes(storage.join(res.run_dir, "metrics.jsonl")).decode().splitlines()]
    steady = [ln for ln in lines if not ln.get("final") and ln["step"] > lines[0]["step"]] or lines[:1]
    step_time = sorted(ln["step_time_s"] for ln in steady)[len(steady) // 2]  # median, past the first report
    files = [f.rsplit("/", 1)[-1] for f in storage.list_files(res.checkpoint_uri)]
    out = {
        "run": name, "wall_s": round(wall, 1), "steps": m.get("step"), "samples_seen": m.get("samples_seen_total"),
        "step_time_s": round(step_time, 4),
        "samples_per_s": round(cfg.data.batch_size * cfg.train.gradient_accumulation_steps / step_time, 1),
        "peak_gpu_mem_mb": round(max((ln.get("gpu_mem_mb", 0.0) for ln in lines), default=0.0), 1),
        "val_r_at_1": m.get("val_r_at_1"), "val_r_at_1_i2t": m.get("val_r_at_1_i2t"),
        "val_r_at_1_t2i": m.get("val_r_at_1_t2i"), "chance_r_at_1": 1.0 / max(1, m.get("val_records", 1)),
        "final_loss": m.get("loss"), "temperature": m.get("temperature"),
        "checkpoint_has": {"portable": "portable.pt" in files, "model_heads": "heads.pt" in files,
                           "loss_state": "loss_state.pt" in files,
                           "deepspeed_files": sum(1 for f in files if f.endswith(".pt") and ("optim" in f or "model_states" in f))},
        "ok": True,
    }
    finite = all(isinstance(out[k], (int, float)) and math.isfinite(out[k]) for k in ("step_time_s", "val_r_at_1", "final_loss"))
    out["ok"] = bool(finite and out["samples_seen"] and out["checkpoint_has"]["model_heads"])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the CPU rehearsal)", file=sys.stderr)
        return 2
    os.environ["DS_ACCELERATOR"] = "cpu" if args.cpu else "cuda"
    if args.workdir:
        return check(args, torch, args.workdir)
    with tempfile.TemporaryDirectory(prefix="gammaray-gpu-check-") as root:  # removed on the way out, failures too
        return check(args, torch, root)


def check(args, torch, root: str) -> int:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if not args.cpu else "cpu"}
    try:
        import deepspeed
        import ray

        env.update(deepspeed=deepspeed.__version__, ray=ray.__version__)
    except Exception as err:  # noqa: BLE001
        env["import_error"] = repr(err)
    print("gpu_check:", json.dumps(env), flush=True)
    t0 = time.perf_counter()
    cat = make_catalogue(root, args.n_train, args.n_val)
    print(f"gpu_check: catalogue ready in {time.perf_counter() - t0:.1f}s at {root}", flush=True)
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"],
                                           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    base = {"data.train": cat["train"], "data.val": cat["val"], "data.tokenizer": cat["tokenizer"],
            "run.storage": os.path.join(root, "runs"), "train.workers": 1, "train.use_gpu": not args.cpu,
            "train.cpus_per_worker": 1, "train.precision": "bf16", "data.batch_size": args.batch_size,
            "train.epochs": args.epochs, "train.log_every": 5, "train.checkpoint_every": 10_000,
            "data.preprocess_num_cpus": 1, "train.optim.warmup_steps": 10}
    if args.tiny:
        base.update(TINY)
    from gammaray.config import parse_override

    base.update(dict(parse_override(o) for o in args.overrides))
    runs = [(f"zero{s}-bf16", {"train.strategy": "deepspeed", "train.deepspeed.zero_stage": int(s)})
            for s in args.stages.split(",") if s.strip()]
    if args.ddp:
        runs.append(("ddp-bf16", {"train.strategy": "ddp"}))
    results = []
    for name, extra in runs:
        print(f"gpu_check: {name} ...", flush=True)
        try:
            r = run_one(name, {**base, **extra, "run.name": f"gpu-check-{name}"}, root)
        except Exception as err:  # noqa: BLE001 - report every run, then fail at the end
            traceback.print_exc()
            r = {"run": name, "ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
        results.append(r)
        print("gpu_check: " + json.dumps(r), flush=True)
        with open(args.json, "w") as f:  # after every run: a later timeout still leaves the earlier ones
            json.dump({"env": env, "args": vars(args), "runs": results}, f, indent=1)
    print(f"\n{'run':10} {'ok':>3} {'steps':>5} {'step s':>8} {'samples/s':>10} {'peak MB':>9} {'val R@1':>8} {'chance':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['run']:10} {'no':>3}  {r['error'][:90]}")
            continue
        print(f"{r['run']:10} {'yes' if r['ok'] else 'no':>3} {r['steps']:>5} {r['step_time_s']:>8.4f} "
              f"{r['samples_per_s']:>10.1f} {r['peak_gpu_mem_mb']:>9.1f} {r['val_r_at_1']:>8.3f} {r['chance_r_at_1']:>7.3f}")
    print(f"gpu_check: total {time.perf_counter() - t0:.1f}s; results in {args.json}")
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
