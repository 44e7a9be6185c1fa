"""`gammaray bench batch`: per-device micro-batch size vs retrieval quality, peak memory and step time.

Two-tower models (the project's default towers: a small ResNet and a small BERT, `workers.models`) are
trained from scratch with InfoNCE at micro-batch 16, 32, 64, 128 and with the gamma loss at 16, 32, all
for the same number of samples seen, on
  - synthetic: the project's synthetic catalogue (`pipelines.synthetic`), and
  - openclipart: real clip art with its titles, tags and folder category (Debian's openclipart-png and
    openclipart-svg, fetched with `apt-get download` + `dpkg-deb -x` into the cache, never the repo;
    skipped with a message where apt-get is missing),
then evaluated by image->text and text->image retrieval on a held-out split (R@K = mean of the two
directions; ties count against, `workers.evaluation.metrics`).

Records go through the project's own preprocessing (`pipelines.preprocess.preprocess_batch`: checked
decode, resize, tokenise with a WordPiece tokenizer trained on the training texts by
`pipelines.tokenizer.train_wordpiece`; undecodable or oversized images are quarantined and counted),
cached as arrays. The loss is `workers.training.objective.Objective` (what training uses), the optimiser AdamW
with the project's parameter groups and warm-up + cosine schedule (`workers.training.engine`).

Peak memory, honestly: each configuration trains in a fresh process. On CPU the figure is the growth
of that process's peak resident set (VmHWM, reset through /proc/self/clear_refs once the data is
loaded) from the model's construction to the end of training: parameters, gradients, optimiser state,
activations, loss state and allocator slack. On CUDA it is torch.cuda.max_memory_allocated over the
same span. Step time is timed separately, gamma and InfoNCE alternating on one model in one process
(so machine load hits both alike), as medians: on CPU the training thread's CPU time with one torch
thread (wall-clock time on a shared machine is meaningless), on CUDA wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

from gammaray.app.benchmarks.common import markdown_table, peak_rss, reset_peak_rss

# the data sets' fetchers live with the other public catalogues; re-exported for the tests and callers
from pipelines.public_catalogues import Unavailable, fetch_openclipart, openclipart_records  # noqa: F401

GRID = (("infonce", 16), ("infonce", 32), ("infonce", 64), ("infonce", 128), ("gamma", 16), ("gamma", 32))
DATASETS = ("synthetic", "openclipart")


def default_cache() -> str:
    return os.environ.get("GAMMARAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gammaray"))


# ------------------------------------------------------------------------------------------------
# records


def synthetic_records(cache: str, n_train: int, n_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    from pipelines.synthetic import write_raw_catalogue

    root = os.path.join(cache, f"bench-synthetic-{n_train}-{n_val}-{seed}")
    if not os.path.exists(os.path.join(root, "val.jsonl")):
        write_raw_catalogue(root + ".tmp", n_train=n_train, n_val=n_val, seed=seed)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(root + ".tmp", root)
    out = []
    for split in ("train", "val"):
        rows = []
        with open(os.path.join(root, f"{split}.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                with open(os.path.join(root, r["image"]), "rb") as img:
                    r["image"] = img.read()
                rows.append(r)
        out.append(rows)
    return out[0], out[1]


def _preprocess_chunk(args):
    rows, spec, tok_dir = args
    from pipelines.preprocess import preprocess_batch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    batch = {"sample_index": [r["sample_index"] for r in rows], "title": [r["title"] for r in rows],
             "description": [r.get("description") for r in rows], "category": [r.get("category") for r in rows],
             "image": [r["image"] for r in rows], "product_id": [r["product_id"] for r in rows]}
    return preprocess_batch(batch, spec, tok)


def build_arrays(name: str, train: list[dict], val: list[dict], cache: str, image_size: int, max_tokens: int,
                 workers: int = 2, progress: bool = True) -> str:
    """Preprocess both splits once; returns the path of the cached .npz (pixels as float16)."""
    from gammaray.config import AugmentConfig
    from pipelines.preprocess import PreprocessSpec, record_text
    from pipelines.tokenizer import train_wordpiece
    from tqdm import tqdm

    path = os.path.join(cache, f"bench-{name}-{len(train)}-{len(val)}-{image_size}-{max_tokens}.npz")
    if os.path.exists(path):
        return path
    tok_dir = os.path.join(cache, f"bench-{name}-tokenizer-{len(train)}")
    train_wordpiece((record_text(r["title"], r.get("description"), r.get("category")) for r in train), tok_dir,
                    vocab_size=2000)
    spec = PreprocessSpec(image_size=image_size, max_image_pixels=25_000_000, max_text_tokens=max_tokens,
                          max_text_chars=8192, augment=AugmentConfig(), tokenizer_uri=tok_dir, seed=0, epoch=0,
                          with_aug_views=False, train=False)
    arrays, rejected = {}, {}
    for split, rows in (("train", train), ("val", val)):
        for i, r in enumerate(rows):
            r["sample_index"] = i
        chunks = [(rows[k:k + 64], spec, tok_dir) for k in range(0, len(rows), 64)]
        outs = []
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for o in tqdm(pool.imap(_preprocess_chunk, chunks), total=len(chunks), disable=not progress,
                              desc=f"{name} {split}: decode + tokenise"):
                    outs.append(o)
        else:
            outs = [_preprocess_chunk(c) for c in tqdm(chunks, disable=not progress, desc=f"{name} {split}")]
        from gammaray.schema import BatchKeys as K

        ok = np.concatenate([o[K.REJECT] == "" for o in outs])
        rejected[split] = {}
        for o in outs:
            for reason in o[K.REJECT]:
                if reason:
                    rejected[split][reason] = rejected[split].get(reason, 0) + 1
        arrays[f"{split}_pixels"] = np.concatenate([o[K.PIXELS] for o in outs])[ok].astype(np.float16)
        arrays[f"{split}_ids"] = np.concatenate([o[K.INPUT_IDS] for o in outs])[ok]
        arrays[f"{split}_mask"] = np.concatenate([o[K.ATTENTION_MASK] for o in outs])[ok]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    arrays["vocab_size"] = np.array(len(tok))
    arrays["pad_token_id"] = np.array(tok.pad_token_id or 0)
    arrays["quarantined"] = np.array(json.dumps(rejected))
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)
    for split, reasons in rejected.items():
        if reasons:
            print(f"{name} {split}: quarantined {sum(reasons.values())} records: {reasons}")
    return path


# ------------------------------------------------------------------------------------------------
# one training run (in a fresh process)


def _config(loss: str, batch_size: int):
    from gammaray.config import GammarayConfig, apply_overrides

    return apply_overrides(GammarayConfig(), {"loss.kind": loss, "data.batch_size": batch_size})


def _batch(data, split, idx, device):
    import torch

    from gammaray.schema import BatchKeys as K

    return {K.SAMPLE_INDEX: torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(device),
            K.PIXELS: torch.from_numpy(data[f"{split}_pixels"][idx].astype(np.float32)).to(device),
            K.INPUT_IDS: torch.from_numpy(data[f"{split}_ids"][idx]).to(device),
            K.ATTENTION_MASK: torch.from_numpy(data[f"{split}_mask"][idx]).to(device)}


def train_one(job: dict) -> dict:
    """Train one (dataset, loss, batch size) configuration; run in its own process."""
    import torch

    from workers.training.engine import lr_lambda, param_groups
    from workers.evaluation.metrics import retrieval_metrics
    from workers.models.registry import build_model
    from workers.training.objective import Objective

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    npz = np.load(job["npz"])
    data = {k: npz[k] for k in npz.files}
    n_train = len(data["train_ids"])
    B, samples = job["batch_size"], job["samples"]
    steps = samples // B
    cfg = _config(job["loss"], B)
    torch.manual_seed(job["seed"])

    # memory baseline: data loaded, nothing of the model yet
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    model = build_model(cfg.model, vocab_size=int(data["vocab_size"]), pad_token_id=int(data["pad_token_id"])).to(device)
    objective = Objective(cfg.loss, num_samples=n_train, seed=job["seed"], device=device, distributed=False)
    o = cfg.train.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    warmup = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps, o.min_lr_ratio))
    rng = np.random.default_rng(job["seed"])
    order, pos = rng.permutation(n_train), 0
    from tqdm import tqdm

    model.train()
    bar = tqdm(range(steps), desc=f"{job['dataset']} {job['loss']} B={B}", disable=not job["progress"],
               mininterval=2.0, leave=False)
    losses = []
    t0 = time.perf_counter()
    for step in bar:
        if pos + B > n_train:                       # a new epoch (drop_last)
            order, pos = rng.permutation(n_train), 0
        idx = np.sort(order[pos:pos + B])
        pos += B
        batch = _batch(data, "train", idx, device)
        out = model(batch)
        terms = objective(out, batch, progress=step / steps)
        loss = terms.total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.gradient_clipping)
        opt.step()
        sched.step()
        if step % 20 == 0:
            losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    train_s = time.perf_counter() - t0

    model.eval()
    img, txt = [], []
    with torch.no_grad():
        n_val = len(data["val_ids"])
        for k in range(0, n_val, 128):
            b = _batch(data, "val", np.arange(k, min(n_val, k + 128)), device)
            out = model(b)
            img.append(out["image"].float().cpu())
            txt.append(out["text"].float().cpu())
    m = retrieval_metrics(torch.cat(img), torch.cat(txt), ks=(1, 5))
    return {"dataset": job["dataset"], "loss": job["loss"], "batch_size": B,
            "r_at_1": 0.5 * (m["r_at_1_i2t"] + m["r_at_1_t2i"]), "r_at_5": 0.5 * (m["r_at_5_i2t"] + m["r_at_5_t2i"]),
            "peak_mem_mb": peak / 2**20, "samples_seen": steps * B,
            "_extra": {"r_at_1_i2t": m["r_at_1_i2t"], "r_at_1_t2i": m["r_at_1_t2i"], "val_records": n_val,
                       "train_records": n_train, "steps": steps, "train_s": train_s, "device": str(device),
                       "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}}


def _child(job: dict, queue) -> None:
    try:
        queue.put(("ok", train_one(job)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback

        queue.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def run_fresh(job: dict) -> dict:
    """train_one in a fresh spawned process (a clean memory baseline per configuration)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(job, q))
    p.start()
    status, payload = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"bench batch {job['dataset']} {job['loss']} B={job['batch_size']} failed:\n{payload}")
    return payload


# ------------------------------------------------------------------------------------------------
# step time: gamma vs InfoNCE at equal batch, alternating on one model


def step_times(batch_sizes, device_name: str, threads: int, rounds: int = 8, steps_per_round: int = 4,
               embed_only_steps: int = 100) -> list[dict]:
    import torch

    from gammaray.schema import BatchKeys as K
    from workers.models.registry import build_model
    from workers.training.objective import Objective

    device = torch.device(device_name)
    # on CPU: one thread and that thread's CPU time, so that other load on the machine does not count
    # (wall-clock time on a shared machine swings by 10x); on CUDA: wall clock around synchronisations
    torch.set_num_threads(1 if device.type == "cpu" else threads)
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    cfg = _config("infonce", 16)
    rows = []
    for B in batch_sizes:
        torch.manual_seed(0)
        model = build_model(cfg.model, vocab_size=2000, pad_token_id=0).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        objectives = {k: Objective(_config(k, B).loss, num_samples=100_000, seed=0, device=device, distributed=False)
                      for k in ("infonce", "gamma")}
        H, L = cfg.data.image_size, cfg.data.max_text_tokens
        g = torch.Generator().manual_seed(B)
        batch = {K.PIXELS: torch.randn(B, 3, H, H, generator=g).to(device),
                 K.INPUT_IDS: torch.randint(5, 2000, (B, L), generator=g).to(device),
                 K.ATTENTION_MASK: torch.ones(B, L, dtype=torch.long).to(device)}
        times = {"infonce": [], "gamma": []}
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for r in range(rounds + 1):
            for kind in (("infonce", "gamma") if r % 2 == 0 else ("gamma", "infonce")):
                for s in range(steps_per_round):
                    batch[K.SAMPLE_INDEX] = torch.randint(0, 100_000, (B,), generator=g).to(device)
                    sync()
                    t = clock()
                    out = model(batch)
                    loss = objectives[kind](out, batch, progress=0.5).total
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sync()
                    if r > 0:                    # round 0 warms up
                        times[kind].append(clock() - t)
        # the loss alone (forward + backward from embeddings)
        loss_times = {"infonce": [], "gamma": []}
        D = cfg.model.embed_dim
        for kind in ("infonce", "gamma", "infonce", "gamma"):
            for s in range(embed_only_steps // 2):
                img = torch.nn.functional.normalize(torch.randn(B, D, device=device), dim=1).requires_grad_()
                txt = torch.nn.functional.normalize(torch.randn(B, D, device=device), dim=1).requires_grad_()
                scale = torch.tensor([10.0], device=device, requires_grad=True)
                idx = torch.randint(0, 100_000, (B,), device=device)
                sync()
                t = clock()
                loss = objectives[kind]({"image": img, "text": txt, "logit_scale": scale}, {K.SAMPLE_INDEX: idx}).total
                loss.backward()
                sync()
                loss_times[kind].append(clock() - t)
        peak = {}
        if device.type == "cuda":  # peak memory of a training step per loss (fresh optimiser state)
            for kind in ("infonce", "gamma"):
                m2 = build_model(cfg.model, vocab_size=2000, pad_token_id=0).to(device)
                o2 = torch.optim.AdamW(m2.parameters(), lr=1e-4)
                del model, opt
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                for s in range(3):
                    out = m2(batch)
                    loss = objectives[kind](out, batch, progress=0.5).total
                    o2.zero_grad(set_to_none=True)
                    loss.backward()
                    o2.step()
                torch.cuda.synchronize()
                peak[kind] = (torch.cuda.max_memory_allocated() - base) / 2**20
                model, opt = m2, o2
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        lmed = {k: float(np.median(v)) * 1e3 for k, v in loss_times.items()}
        rows.append({"batch_size": B, "device": device_name + (" (thread CPU time)" if device.type == "cpu" else ""),
                     "step_ms_infonce": med["infonce"],
                     "step_ms_gamma": med["gamma"], "step_ratio": med["gamma"] / med["infonce"],
                     "loss_ms_infonce": lmed["infonce"], "loss_ms_gamma": lmed["gamma"],
                     "steps_timed": len(times["gamma"]),
                     **({"cuda_peak_mb_infonce": peak["infonce"], "cuda_peak_mb_gamma": peak["gamma"]} if peak else {})})
    return rows


# ------------------------------------------------------------------------------------------------
# reporting


def format_rows(rows: list[dict]) -> str:
    return markdown_table(["dataset", "loss", "batch", "R@1", "R@5", "peak MB", "samples seen"],
                          [[r["dataset"], r["loss"], str(r["batch_size"]), f"{r['r_at_1']:.3f}", f"{r['r_at_5']:.3f}",
                            f"{r['peak_mem_mb']:.0f}", str(r["samples_seen"])] for r in rows])


def format_times(rows: list[dict]) -> str:
    cuda = any("cuda_peak_mb_gamma" in r for r in rows)
    header = ["device", "batch", "step ms InfoNCE", "step ms gamma", "gamma / InfoNCE", "loss-only ms InfoNCE",
              "loss-only ms gamma"] + (["CUDA peak MB InfoNCE", "CUDA peak MB gamma"] if cuda else [])
    cells = []
    for r in rows:
        row = [r["device"], str(r["batch_size"]), f"{r['step_ms_infonce']:.2f}", f"{r['step_ms_gamma']:.2f}",
               f"{r['step_ratio']:.3f}", f"{r['loss_ms_infonce']:.3f}", f"{r['loss_ms_gamma']:.3f}"]
        if cuda:
            row += [f"{r.get('cuda_peak_mb_infonce', float('nan')):.0f}", f"{r.get('cuda_peak_mb_gamma', float('nan')):.0f}"]
        cells.append(row)
    return markdown_table(header, cells)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: DATASETS.index(d) if d in DATASETS else 9)
    fig, axes = plt.subplots(1, 2 * len(datasets), figsize=(5.0 * 2 * len(datasets), 3.8), squeeze=False)
    for j, ds in enumerate(datasets):
        for loss, colour, marker in (("infonce", "tab:blue", "o"), ("gamma", "tab:red", "s")):
            rs = sorted([r for r in rows if r["dataset"] == ds and r["loss"] == loss], key=lambda r: r["batch_size"])
            if not rs:
                continue
            b = [r["batch_size"] for r in rs]
            axes[0][2 * j].plot(b, [r["r_at_1"] for r in rs], marker=marker, color=colour, label=f"{loss} R@1")
            axes[0][2 * j].plot(b, [r["r_at_5"] for r in rs], marker=marker, color=colour, ls="--", label=f"{loss} R@5")
            axes[0][2 * j + 1].plot(b, [r["peak_mem_mb"] for r in rs], marker=marker, color=colour, label=loss)
        for ax, ylabel in ((axes[0][2 * j], "held-out retrieval recall"), (axes[0][2 * j + 1], "peak memory per worker (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks([16, 32, 64, 128])
            ax.set_xticklabels(["16", "32", "64", "128"])
            ax.set_xlabel("micro-batch")
            ax.set_ylabel(ylabel)
            ax.set_title(ds)
            ax.legend(fontsize=7)
    seen = {r["samples_seen"] for r in rows}
    fig.suptitle(f"Micro-batch vs quality and memory (same samples seen: {sorted(seen)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", required=True, help="write the rows here (the plot goes next to it, .png)")
    p.add_argument("--png", metavar="PATH", help="plot path (default: the JSON path with .png)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="default: both")
    p.add_argument("--samples", type=int, default=4096, help="samples seen by every configuration (default 4096)")
    p.add_argument("--max-records", type=int, default=4000,
                   help="openclipart: at most this many records (train + held-out; default 4000, 0 = all ~7,600)")
    p.add_argument("--n-train", type=int, default=2000, help="synthetic catalogue: training products (default 2000)")
    p.add_argument("--n-val", type=int, default=500, help="held-out records per data set (default 500)")
    p.add_argument("--cache", default=None, help="where data and preprocessed arrays are cached "
                   "(default $GAMMARAY_CACHE or ~/.cache/gammaray; never inside the repository)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="torch threads per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-only", action="store_true", help="only the step-time comparison (random inputs)")
    p.add_argument("--skip-timing", action="store_true", help="no step-time comparison")
    p.add_argument("--timing-batch-sizes", type=int, nargs="+", default=[16, 32],
                   help="batch sizes of the step-time comparison (default 16 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = os.path.abspath(args.cache or default_cache())
    os.makedirs(cache, exist_ok=True)
    out = {"rows": [], "step_times": [], "skipped": []}
    png = args.png or os.path.splitext(args.json)[0] + ".png"
    rows: list[dict] = []
    if not args.timing_only:
        for ds in args.datasets:
            try:
                if ds == "synthetic":
                    train, val = synthetic_records(cache, args.n_train, args.n_val, args.seed)
                else:
                    train, val = openclipart_records(cache, args.n_val, args.seed, args.max_records)
            except Unavailable as err:
                print(str(err), file=sys.stderr)
                out["skipped"].append({"dataset": ds, "reason": str(err)})
                continue
            npz = build_arrays(ds, train, val, cache, image_size=64, max_tokens=32, progress=not args.quiet)
            del train, val
            for loss, B in GRID:
                job = {"dataset": ds, "loss": loss, "batch_size": B, "samples": args.samples, "npz": npz,
                       "seed": args.seed, "device": device, "threads": args.threads, "progress": not args.quiet}
                row = run_fresh(job)
                extra = row.pop("_extra")
                rows.append(row)
                print(f"{ds:12s} {loss:8s} B={B:<4d} R@1 {row['r_at_1']:.3f} R@5 {row['r_at_5']:.3f} "
                      f"peak {row['peak_mem_mb']:.0f} MB  ({extra['steps']} steps, {extra['train_s']:.0f} s, loss "
                      f"{extra['first_loss']:.3f} -> {extra['last_loss']:.3f})", flush=True)
    if not args.skip_timing:
        out["step_times"] = step_times(tuple(args.timing_batch_sizes), device, args.threads)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    side = os.path.splitext(args.json)[0] + ".timing.json"
    with open(side, "w") as f:
        json.dump({"step_times": out["step_times"], "skipped": out["skipped"]}, f, indent=1)
    if rows:
        plot(rows, png)
        print(format_rows(rows))
        print(f"peak memory: {'torch.cuda.max_memory_allocated' if device == 'cuda' else 'growth of the peak RSS (VmHWM)'}"
              " of a fresh process per configuration, from model construction to the end of training")
    if out["step_times"]:
        print(format_times(out["step_times"]))
    print(f"wrote {args.json}" + (f", {png}" if rows else "") + f" and {side}")
    return 0
