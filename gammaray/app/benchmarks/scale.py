"""How the data path's costs grow with the catalogue: prepare, tokenizer, plan, embed work list,
time to first batch (fresh and after a resume) and the loss-state checkpoint, from 10k records up.

Real catalogues (`--sizes`, default 10k and 100k): a synthetic raw catalogue of N records (about
450 B of text each, 16 small shared JPEGs) is prepared with the `gammaray prepare` of this branch,
then measured. Synthetic manifests (`--manifest-sizes`, default 10M and 100M): a catalogue index of
shards of 1,000 records in row groups of 128, without shards behind it, for the pieces that only
read the index (plan setup per worker, embed work-list setup). Every figure comes from a fresh
process (so peak memory is its own), and is printed with its growth fitted as n^k over the sizes.

Rows (JSON list): {"n", "metric", "value", "unit", "measured", ...}; measured is false where a
figure is extrapolated (none is: every row here is measured). Metrics:

| metric | what |
|---|---|
| prepare_peak_rss_mb | peak resident set (VmHWM) of the prepare process, the driver (Ray's own processes not included) |
| prepare_worker_peak_rss_mb | (`cpus` > 1) the largest peak resident set of a Ray worker process of that prepare (`workers`: how many ran) |
| prepare_records_per_s | records prepared per second; `cpus`: the CPUs prepare was given |
| tokenizer_s | WordPiece training on a seeded sample of `--tokenizer-sample` texts (`sample` field) |
| plan_setup_s, plan_setup_mb | (`cpu_s`: the CPU time of it, which a loaded machine does not inflate) one worker's setup before its pipeline starts: manifest header + unit table + its part of the epoch + the first window's read items (`workers` field: W) |
| embed_setup_s | `gammaray embed`'s work list (manifest + unit table + pending row groups + items) |
| first_batch_s | a fresh worker (Ray running): manifest, plan, pipeline, first batch of `--batch-size` |
| first_batch_after_resume_s | the same from the middle of the epoch, after reading its loss-state shard |
| ckpt_save_s, ckpt_restore_s | one rank's loss-state shard (12 B x N / W): torch.save, and the safe load of it |
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

METRICS = ("prepare_peak_rss_mb", "prepare_worker_peak_rss_mb", "prepare_records_per_s", "tokenizer_s", "plan_setup_s",
           "plan_setup_mb", "embed_setup_s", "first_batch_s", "first_batch_after_resume_s", "ckpt_save_s", "ckpt_restore_s")
UNITS = {"prepare_peak_rss_mb": "MB", "prepare_worker_peak_rss_mb": "MB", "prepare_records_per_s": "records/s",
         "plan_setup_mb": "MB"}
ROW_KEYS = ("n", "metric", "value", "unit", "measured")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="10000,100000", help="records of the real catalogues (default 10000,100000)")
    p.add_argument("--manifest-sizes", default="10000000,100000000",
                   help="records of the synthetic manifests (plan and embed setup only; default 10M,100M)")
    p.add_argument("--workers", type=int, default=8, help="W of the plan (default 8)")
    p.add_argument("--stream-workers", type=int, default=2, help="W of the first-batch runs (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="records of the first batch (default 32)")
    p.add_argument("--tokenizer-sample", type=int, default=300_000,
                   help="texts the tokenizer trains on (default 300000: the 100k catalogue whole, a sample beyond)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: prepare,tokenizer,stream,manifest")
    p.add_argument("--workdir", help="where catalogues go (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--png", metavar="PATH", help="plot every metric against n (log-log)")


# --------------------------------------------------------------------------------------------
# inputs


def write_raw(folder: str, n: int) -> str:
    """N JSONL records (~450 B of text each) sharing 16 small JPEGs."""
    from pipelines import faults

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for i in range(16):
        with open(os.path.join(folder, "img", f"{i}.jpg"), "wb") as f:
            f.write(faults.good_jpeg(side=32, seed=i))
    words = ["lamp", "oak", "steel", "soft", "blue", "round", "desk", "garden", "linen", "matte", "classic", "tall"]
    src = os.path.join(folder, "items.jsonl")
    with open(src, "w") as f:
        for i in range(n):
            w = [words[(i * k + k) % len(words)] for k in range(1, 8)]
            desc = (" ".join(w) + f" item {i} ") * 6
            f.write(json.dumps({"product_id": f"P{i:09d}", "title": f"{w[0]} {w[1]} {w[2]} no {i}",
                                "description": desc[:400], "category": f"Home > {w[3].title()}",
                                "image": f"img/{i % 16}.jpg"}) + "\n")
    return src


def write_synthetic_manifest(dst: str, n: int, shard_rows: int = 1000, group_rows: int = 128) -> None:
    """A catalogue header + shard index for n records, no shards behind it (setup costs only)."""
    from gammaray.schema import SCHEMA_VERSION
    from pipelines.catalogue import commit_manifest

    groups = [group_rows] * (shard_rows // group_rows) + ([shard_rows % group_rows] if shard_rows % group_rows else [])
    shards = [{"path": f"shards/part-{i:06d}.parquet", "num_rows": shard_rows, "row_groups": groups,
               "sha256": f"{i:064x}"} for i in range(n // shard_rows)]
    manifest = {"schema_version": SCHEMA_VERSION, "num_records": n, "next_sample_index": n, "shards": shards,
                "sources": ["synthetic"], "categories": [], "locales": [],
                "quarantine": {"count": 0, "by_reason": {}, "files": []}}
    commit_manifest(dst, manifest, None)


# --------------------------------------------------------------------------------------------
# measurements, each in a fresh process (`child`)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def _warm_parquet() -> None:
    """The first Parquet read of a process costs about 1 s and 55 MB (the library's own start-up),
    whatever it reads; a worker pays it for its shards anyway, so the setup figures leave it out."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [[1]]}), buf, compression="zstd")
    pq.read_table(io.BytesIO(buf.getvalue()))


def child(kind: str, p: dict) -> dict:
    from gammaray.app.benchmarks.common import peak_rss, reset_peak_rss

    if kind == "prepare":
        from pipelines.prepare import PrepareOptions, prepare

        fields = getattr(PrepareOptions, "__dataclass_fields__", {})
        extra = {k: p["cpus"] for k in ("cpus", "num_cpus") if k in fields}
        opts = PrepareOptions(progress=False, **extra)
        t0 = time.perf_counter()
        workers = _RayWorkerPeaks() if p["cpus"] > 1 and extra else None
        if workers is not None:  # started here (as prepare would) so that its workers outlive prepare
            from pipelines import prepare_parallel

            prepare_parallel.start_ray(opts)
            workers.start()
        res = prepare(p["src"], p["dst"], opts)
        wall = time.perf_counter() - t0
        out = {"wall_s": wall, "records": res.num_written, "peak_rss_mb": peak_rss() / 2**20,
               "cpus": p["cpus"] if extra else 1}
        if workers is not None:
            out.update(workers.stop())
        return out
    if kind == "tokenizer":
        from pipelines.catalogue import load_manifest
        from pipelines.tokenizer import build_for_catalogue

        t0 = time.perf_counter()
        build_for_catalogue(p["dst"], p["out"], load_manifest(p["dst"]), vocab_size=8000, sample=p["sample"])
        return {"wall_s": time.perf_counter() - t0}
    if kind == "plan":
        import numpy as np

        from pipelines.catalogue import load_manifest
        from pipelines.plan import epoch_part
        from pipelines.stream import WINDOW_TASKS, units_from_manifest

        _warm_parquet()
        base = reset_peak_rss() / 2**20
        t0, c0 = time.perf_counter(), time.process_time()
        units = units_from_manifest(load_manifest(p["dst"]))
        part = epoch_part(units, 0, 0, p["workers"], 0, True)
        first = part[:WINDOW_TASKS * 4]
        ids = np.fromiter((s.unit for s in first), np.int64, len(first))
        items = [{"unit": int(u), "start": s.start, "stop": s.stop, "shard": units.shards[int(units.shard_of[u])]}
                 for u, s in zip(ids, first)]
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "cpu_s": time.process_time() - c0, "mb": peak_rss() / 2**20 - base, "units": len(units), "segments": len(part),
                "items": len(items)}
    if kind == "embed":
        from pipelines.catalogue import load_manifest
        from pipelines.stream import units_from_manifest
        from workers.evaluation.embed import work_list

        _warm_parquet()
        t0, c0 = time.perf_counter(), time.process_time()
        units = units_from_manifest(load_manifest(p["dst"]))
        todo = work_list(units, set())
        items = [dict(zip(todo, vals)) for vals in zip(*(v.tolist() for v in todo.values()))]
        return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "items": len(items)}
    if kind == "stream":
        return _first_batch(p)
    raise ValueError(kind)


def _first_batch(p: dict) -> dict:
    import ray
    import torch

    from gammaray.config import GammarayConfig, apply_overrides
    from pipelines.catalogue import load_manifest
    from pipelines.plan import advance, epoch_part
    from pipelines.stream import close_prefetched, iterate, units_from_manifest
    from pipelines.stream import StreamSpec
    from workers.safe_load import load as load_data

    cfg = apply_overrides(GammarayConfig(), {"data.train": p["dst"], "data.tokenizer": p["tokenizer"],
                                             "data.image_size": 64, "data.preprocess_concurrency": 1})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    W, n = p["workers"], p["n"]
    shard_file = os.path.join(p["tmp"], "loss_state.pt")
    for mode in (p["mode"],):  # one mode per process: the first pipeline of a process starts Ray Data's workers
        t0 = time.perf_counter()
        units = units_from_manifest(load_manifest(p["dst"]))
        part = epoch_part(units, 0, cfg.run.seed, W, 0, True)
        if mode == "resume":
            t1 = time.perf_counter()
            load_data(shard_file, shard_file)  # this rank's loss-state shard only
            out["ckpt_restore_s"] = time.perf_counter() - t1
            part = advance(part, sum(s.size for s in part) // 2)
        spec = StreamSpec.from_config(cfg, p["dst"], units, epoch=0, train=True, with_aug=False,
                                      batch_size=p["batch_size"])
        batch = next(iter(iterate(spec, part)))
        out[f"{mode}_s"] = time.perf_counter() - t0
        assert batch.size > 0
        close_prefetched()
        if mode == "fresh":  # the checkpoint the resume reads
            shard = {"gamma": {"log_rate": torch.randn(math.ceil(n / W)), "num_samples": n, "rank": 0,
                               "world_size": W}}
            t1 = time.perf_counter()
            torch.save(shard, shard_file)
            out["ckpt_save_s"] = time.perf_counter() - t1
    ray.shutdown()
    return out


class _RayWorkerPeaks:
    """The peak resident set (VmHWM) of every Ray worker process under this one, sampled twice a
    second while prepare runs (an idle worker Ray stops is counted up to its last sample)."""

    def __init__(self):
        import threading

        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                if not proc.cmdline()[0].startswith("ray::"):
                    continue
                with open(f"/proc/{proc.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            except (psutil.Error, OSError, IndexError, StopIteration):
                continue
            self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), kb * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        import ray

        ray.shutdown()
        return {"worker_peak_rss_mb": max(self.peaks.values(), default=0) / 2**20, "workers": len(self.peaks)}


def run_child(kind: str, params: dict, timeout: float = 3600, tries: int = 3) -> dict:
    """One measurement in a fresh process; tried again when it fails (on a loaded machine Ray's
    start-up can time out), the failure printed."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "true"),
               RAY_raylet_start_wait_time_s=os.environ.get("RAY_raylet_start_wait_time_s", "180"))
    for attempt in range(tries):
        proc = subprocess.run([sys.executable, "-m", "gammaray.app.benchmarks.scale", kind, json.dumps(params)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  bench scale {kind} failed (try {attempt + 1} of {tries}):\n{proc.stderr[-1500:]}", flush=True)
    raise RuntimeError(f"bench scale {kind} failed {tries} times")


# --------------------------------------------------------------------------------------------
# the run


def row(n: int, metric: str, value: float, **extra) -> dict:
    return {"n": n, "metric": metric, "value": round(float(value), 4), "unit": UNITS.get(metric, "s"),
            "measured": True, **extra}


def growth(rows: list[dict], metric: str) -> float | None:
    """k of value ~ n^k, a least-squares fit over log-log points (None with fewer than two sizes)."""
    pts = [(math.log(r["n"]), math.log(r["value"])) for r in rows if r["metric"] == metric and r["value"] > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def measure(args) -> list[dict]:
    skip = set(filter(None, args.skip.split(",")))
    rows: list[dict] = []
    work = args.workdir or tempfile.mkdtemp(prefix="gammaray-scale-")
    cpus = os.cpu_count() or 1
    for n in [int(x) for x in args.sizes.split(",") if x]:
        folder = os.path.join(work, f"n{n}")
        dst = os.path.join(folder, "catalog")
        tok = os.path.join(folder, "tokenizer")
        if "prepare" not in skip or not os.path.exists(os.path.join(dst, "manifest.json")):
            src = write_raw(os.path.join(folder, "raw"), n)
            for d in (dst, f"{dst}-cpus1"):
                shutil.rmtree(d, ignore_errors=True)  # a prepare into an existing catalogue writes nothing
            r = run_child("prepare", {"src": src, "dst": dst, "cpus": cpus})
            runs = [r]
            if r["cpus"] > 1:  # a prepare that takes a CPU count: the same with one, side by side
                runs.append(run_child("prepare", {"src": src, "dst": f"{dst}-cpus1", "cpus": 1}))
            for r in runs:
                rows.append(row(n, "prepare_records_per_s", r["records"] / r["wall_s"], cpus=r["cpus"]))
                rows.append(row(n, "prepare_peak_rss_mb", r["peak_rss_mb"], cpus=r["cpus"]))
                if "worker_peak_rss_mb" in r:
                    rows.append(row(n, "prepare_worker_peak_rss_mb", r["worker_peak_rss_mb"], cpus=r["cpus"],
                                    workers=r["workers"]))
            if len(runs) > 1:
                print(f"  n={n:>11,}  prepare records/s with {runs[0]['cpus']} CPUs / with 1: "
                      f"{runs[1]['wall_s'] / runs[0]['wall_s']:.2f}x", flush=True)
        if "tokenizer" not in skip or ("stream" not in skip and not os.path.exists(tok)):
            r = run_child("tokenizer", {"dst": dst, "out": tok, "sample": args.tokenizer_sample})
            if "tokenizer" not in skip:  # skipped: trained only because the stream needs one, not reported
                rows.append(row(n, "tokenizer_s", r["wall_s"], sample=args.tokenizer_sample))
        r = run_child("plan", {"dst": dst, "workers": args.workers})
        rows += [row(n, "plan_setup_s", r["wall_s"], workers=args.workers, cpu_s=round(r["cpu_s"], 4)),
                 row(n, "plan_setup_mb", r["mb"], workers=args.workers)]
        r = run_child("embed", {"dst": dst})
        rows.append(row(n, "embed_setup_s", r["wall_s"], cpu_s=round(r["cpu_s"], 4)))
        if "stream" not in skip:
            with tempfile.TemporaryDirectory() as tmp:
                params = {"dst": dst, "tokenizer": tok, "workers": args.stream_workers, "n": n,
                          "batch_size": args.batch_size, "tmp": tmp}
                try:
                    r = run_child("stream", dict(params, mode="fresh"))
                    r.update(run_child("stream", dict(params, mode="resume")))
                except RuntimeError as err:  # Ray could not start: the other figures still stand
                    print(f"  n={n:,}: no first-batch figures ({err})", flush=True)
                    r = None
            rows += [] if r is None else [row(n, "first_batch_s", r["fresh_s"], workers=args.stream_workers),
                     row(n, "first_batch_after_resume_s", r["resume_s"], workers=args.stream_workers),
                     row(n, "ckpt_save_s", r["ckpt_save_s"], workers=args.stream_workers),
                     row(n, "ckpt_restore_s", r["ckpt_restore_s"], workers=args.stream_workers)]
        print_rows([r for r in rows if r["n"] == n])
        if args.json:  # what is measured so far survives a later failure
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    if "manifest" not in skip:
        for n in [int(x) for x in args.manifest_sizes.split(",") if x]:
            dst = os.path.join(work, f"manifest{n}")
            if not os.path.exists(os.path.join(dst, "manifest.json")):
                write_synthetic_manifest(dst, n)
            r = run_child("plan", {"dst": dst, "workers": args.workers})
            new = [row(n, "plan_setup_s", r["wall_s"], workers=args.workers, synthetic_manifest=True,
                       cpu_s=round(r["cpu_s"], 4)),
                   row(n, "plan_setup_mb", r["mb"], workers=args.workers, synthetic_manifest=True)]
            r = run_child("embed", {"dst": dst})
            new.append(row(n, "embed_setup_s", r["wall_s"], synthetic_manifest=True, cpu_s=round(r["cpu_s"], 4)))
            rows += new
            print_rows(new)
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ROW_KEYS)
        print(f"  n={r['n']:>11,}  {r['metric']:<28} {r['value']:>12,.3f} {r['unit']:<10} {extra}", flush=True)


def summary(rows: list[dict]) -> list[str]:
    """One line per metric: its values by n and the fitted growth."""
    lines = []
    for metric in METRICS:
        mine = sorted((r for r in rows if r["metric"] == metric and r.get("cpus", 1) == max(
            (x.get("cpus", 1) for x in rows if x["metric"] == metric), default=1)), key=lambda r: r["n"])
        if not mine:
            continue
        k = growth(mine, metric)
        values = ", ".join(f"{r['n']:,}: {r['value']:,.3f}" for r in mine)
        lines.append(f"{metric:<28} {values}  " + (f"growth n^{k:.2f}" if k is not None else "(one size)"))
    return lines


def markdown(rows: list[dict]) -> str:
    """The docs' table: one row per metric, one column per n, and the fitted growth."""
    from gammaray.app.benchmarks.common import markdown_table

    sizes = sorted({r["n"] for r in rows})
    table = []
    for metric in METRICS:
        of_metric = [r for r in rows if r["metric"] == metric]
        # prepare's figures with N CPUs and with 1 are rows of their own
        for cpus in sorted({r.get("cpus") for r in of_metric}, key=lambda c: -(c or 0)):
            mine = [r for r in of_metric if r.get("cpus") == cpus]
            by_n = {r["n"]: r for r in mine}
            k = growth(mine, metric)
            unit = mine[0]["unit"] + (f", {cpus} CPU{'s' if cpus > 1 else ''}" if cpus else "")
            table.append([f"`{metric}` ({unit})"] + [f"{by_n[n]['value']:,.3f}" if n in by_n else "" for n in sizes]
                         + [f"n^{k:.2f}" if k is not None else ""])
    return markdown_table(["metric"] + [f"{n:,}" for n in sizes] + ["growth"], table)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for metric in METRICS:
        mine = sorted((r for r in rows if r["metric"] == metric and r["unit"] == "s"), key=lambda r: r["n"])
        if mine:
            ax.plot([r["n"] for r in mine], [r["value"] for r in mine], marker="o", label=metric)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("records in the catalogue")
    ax.set_ylabel("seconds")
    ax.set_title("gammaray bench scale: setup costs against catalogue size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run(args) -> int:
    rows = measure(args)
    print("\nby metric (growth fitted as n^k over the sizes):")
    for line in summary(rows):
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
    os._exit(0)  # the figure is out: no interpreter teardown (a library's thread may abort it)
