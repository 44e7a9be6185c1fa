"""`gammaray bench ingest`: records/s through read + decode + augment + tokenize, three ways, one run.

  (a) gammaray   the training stream (`pipelines.stream.iterate`): per epoch one Ray Data pipeline
                 reading row groups from S3 and preprocessing them in 1-CPU tasks, batches of
                 data.batch_size, the next epoch's pipeline started early as in training
  (b) dataloader a plain torch DataLoader over the same row groups, same read and preprocessing code,
                 num_workers = cores, persistent workers
  (c) limit      the same preprocessing code in a tight loop in `cores` processes, bytes already in
                 memory (no storage, no framework): what the machine can do at most

Each is warmed up once (worker processes started, tokenizer loaded), then measured over passes of
`--epochs-per-pass` epochs of the catalogue; the three run in a shuffled order in each of `--rounds`
rounds so that load from other processes hits them alike, and the median round is reported, with
the CPU time per record of each (this process and everything it started). Then a short training run
of the demo model (the demo's config, 2 Ray Train workers) gives the data-stall fraction: the time
the training step waited for data over the wall time, from the first report window on (the very
first steps also pay for starting every worker process once per run; reported separately).

The catalogue is synthetic (`pipelines.synthetic`), prepared into a local SeaweedFS S3 server that the
benchmark starts (or into --storage).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# CPU time of this process and everything it started (Ray's processes, SeaweedFS, pool workers):
# under load from other programs, CPU seconds per record is the steadier figure


def tree_cpu_s() -> float:
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def timed(fn, *a):
    c0 = tree_cpu_s()
    out = fn(*a)
    return out, tree_cpu_s() - c0


# --------------------------------------------------------------------------------------------
# (c) the machine's limit


_LIMIT: dict[str, Any] = {}


def _limit_init(table_bytes: bytes, spec, barrier) -> None:
    """Once per limit process: the rows as in-memory batches, the tokenizer, one warm call."""
    import pyarrow as pa

    from pipelines.preprocess import preprocess_batch
    from pipelines.tokenizer import load_fast as load_tokenizer

    table = pa.ipc.open_stream(table_bytes).read_all()
    groups = [table.slice(s, 128) for s in range(0, table.num_rows, 128)]
    batches = [{c: g.column(c).to_numpy(zero_copy_only=False) for c in g.column_names} for g in groups]
    tok = load_tokenizer(spec.tokenizer_uri, None)
    preprocess_batch(batches[0], spec, tok)
    _LIMIT.update(batches=batches, tok=tok, spec=spec, barrier=barrier)


def _limit_worker(duration: float) -> float:
    """The same per-record code in a tight loop for `duration` seconds; records/s of this process."""
    from pipelines.preprocess import preprocess_batch

    batches, tok, spec = _LIMIT["batches"], _LIMIT["tok"], _LIMIT["spec"]
    _LIMIT["barrier"].wait()  # all processes start together, one call each
    t0 = time.perf_counter()
    n = i = 0
    while time.perf_counter() - t0 < duration:
        b = batches[i % len(batches)]
        preprocess_batch(b, spec, tok)
        n += len(b["sample_index"])
        i += 1
    return n / (time.perf_counter() - t0)


class LimitRunner:
    def __init__(self, table, spec, cores: int):
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        ctx = mp.get_context("spawn")
        self.cores = cores
        self.pool = ctx.Pool(cores, initializer=_limit_init,
                             initargs=(sink.getvalue().to_pybytes(), spec, ctx.Barrier(cores)))

    def run(self, duration: float) -> float:
        return float(sum(self.pool.map(_limit_worker, [duration] * self.cores, chunksize=1)))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


# --------------------------------------------------------------------------------------------
# (b) a plain torch DataLoader


class SegmentDataset:
    """Map-style torch dataset: item i = segment i of the plan, read and preprocessed (same code)."""

    def __init__(self, spec, part):
        self.spec, self.part = spec, list(part)

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from pipelines.preprocess import preprocess_batch
        from pipelines.stream import read_segment_rows
        from pipelines.tokenizer import load_fast as load_tokenizer

        s, spec = self.part[i], self.spec
        pp = spec.preprocess
        table = read_segment_rows(spec.catalogue_uri, spec.units[s.unit], s.unit, s.start, s.stop, pp.epoch,
                                  pp.seed, spec.shuffle, spec.settings, pp.columns)
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        out = preprocess_batch(cols, pp, load_tokenizer(pp.tokenizer_uri, spec.settings))
        return {k: v for k, v in out.items() if v.dtype != object}


def make_dataloader(spec, part, cores: int):
    import torch.utils.data as tud

    return tud.DataLoader(SegmentDataset(spec, part), batch_size=None, shuffle=False, num_workers=cores,
                          persistent_workers=True, prefetch_factor=2, multiprocessing_context="spawn")


def run_dataloader(loader, epochs: int = 1) -> tuple[float, int]:
    """`epochs` passes back to back (persistent workers: the DataLoader's way to keep them warm)."""
    from gammaray.schema import BatchKeys as K

    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += int((np.asarray(batch[K.SAMPLE_INDEX]) >= 0).sum())
    return n / (time.perf_counter() - t0), n


# --------------------------------------------------------------------------------------------
# (a) gammaray's stream


def run_gammaray(spec, part, epochs: int = 1) -> tuple[float, int]:
    """`epochs` passes back to back as training streams them: each epoch's pipeline starts once the
    previous one has produced its last block (`iterate(..., then=...)`, data.prefetch_next_epoch)."""
    import dataclasses

    from pipelines.stream import close_prefetched, iterate

    specs = [dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess, epoch=e))
             for e in range(epochs)]
    t0 = time.perf_counter()
    n = 0
    for e, sp in enumerate(specs):
        then = (specs[e + 1], part) if e + 1 < epochs else None
        for sb in iterate(sp, part, then=then):
            n += sb.size
    close_prefetched()
    return n / (time.perf_counter() - t0), n


# --------------------------------------------------------------------------------------------
# data stall of a short training run of the demo model


def stall_from_metrics(lines: list[dict]) -> dict[str, float]:
    """Wall-time-weighted data-wait fraction over report windows: all, and from the second on."""
    windows = [m for m in lines if "data_wait_fraction" in m and "step_time_s" in m and not m.get("final")]
    steps_prev = 0
    rows = []
    for m in windows:
        steps = int(m["step"]) - steps_prev
        steps_prev = int(m["step"])
        if steps <= 0:
            continue
        rows.append((float(m["data_wait_fraction"]), float(m["step_time_s"]) * steps))
    if not rows:
        return {}

    def frac(rs):
        total = sum(d for _, d in rs)
        return sum(f * d for f, d in rs) / total if total else 0.0

    return {"data_stall_fraction": frac(rows[1:] or rows), "data_stall_fraction_incl_start": frac(rows),
            "data_stall_first_window": rows[0][0], "data_stall_windows": [round(f, 4) for f, _ in rows]}


def run_training(cfg, store, catalogue: str, tok: str, run_storage: str, steps: int, epochs: int) -> dict:
    from gammaray.config import apply_overrides
    from pipelines import storage
    from workers.training.trainer import pretrain

    cfg = apply_overrides(cfg, {"data.train": catalogue, "data.val": None, "data.tokenizer": tok,
                                "run.storage": run_storage, "run.name": f"bench-ingest-{int(time.time())}",
                                "train.epochs": epochs, "train.max_steps": steps, "train.log_every": 5,
                                "train.checkpoint_every": 10**6})
    import ray

    if not ray.is_initialized():
        # what `pretrain` would start (workers.cluster.ensure_ray), but always a fresh local instance:
        # never attach to a cluster someone started with `ray start` on the same machine
        from pipelines.ray_start import private_tmpdir_for_ray

        with private_tmpdir_for_ray():  # the dashboard's pymp-* folder goes with it
            ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1), log_to_driver=True,
                     logging_config=ray.LoggingConfig(log_level="WARNING"),
                     runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                                               "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}})
    res = pretrain(cfg, progress=False)
    lines = [json.loads(x) for x in store.read_bytes(storage.join(res.run_dir, "metrics.jsonl")).decode().splitlines()
             if x.strip()]
    out = stall_from_metrics(lines)
    out.update({"train_steps": res.metrics.get("step"), "train_wall_s": round(res.wall_s, 1),
                "train_step_time_s": statistics.median([m["step_time_s"] for m in lines if "step_time_s" in m
                                                        and not m.get("final")] or [0.0])})
    return out


# --------------------------------------------------------------------------------------------
# the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", type=int, default=4096, help="synthetic catalogue size (default 4096)")
    p.add_argument("--image-side", type=int, default=96, help="side of the synthetic JPEGs (default 96)")
    p.add_argument("--row-group-size", type=int, default=128, help="rows per row group = per task (default 128)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="processes for the DataLoader and the limit, Ray CPUs for gammaray (default: all cores)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved measurement rounds; the median is reported (0 = only the data-stall run)")
    p.add_argument("--epochs-per-pass", type=int, default=2,
                   help="epochs streamed back to back in one measured pass, as in training (default 2)")
    p.add_argument("--no-aug", action="store_true",
                   help="measure without the augmented second views (the demo model's path)")
    p.add_argument("--train-steps", type=int, default=120,
                   help="steps of the demo-model training run for the data-stall fraction (0 = skip)")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of that run (epoch starts are where stalls hide)")
    p.add_argument("--train-records", type=int, default=1024,
                   help="records of the catalogue used by the training run (a prefix; smaller = more epoch starts)")
    p.add_argument("--storage", metavar="URL", help="s3://bucket/prefix to use instead of a local SeaweedFS server")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")


def run(args: argparse.Namespace, cfg=None) -> int:
    import contextlib

    import pyarrow as pa

    from gammaray.config import GammarayConfig
    from pipelines import storage
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.preprocess import PreprocessSpec
    from pipelines.stream import Segment, StreamSpec, read_segment_rows, units_from_manifest
    from pipelines.synthetic import write_raw_catalogue
    from pipelines.tokenizer import build_for_catalogue

    cfg = cfg or GammarayConfig()
    cores = max(1, args.cores)
    say = (lambda *a: print(*a, flush=True))
    result: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if args.storage:
            base = args.storage.rstrip("/")
        else:
            from infra.s3server import SeaweedS3  # operations code: only this entry point starts a server

            s3 = stack.enter_context(SeaweedS3(bucket="gammaray-bench"))
            base = "s3://gammaray-bench"
            say(f"S3 server (SeaweedFS) at {s3.endpoint}")
        store = storage.Store.of(cfg.storage)  # bound once the server's endpoint is in the environment
        raw = stack.enter_context(tempfile.TemporaryDirectory(prefix="gammaray-bench-"))
        say(f"catalogue: {args.records} synthetic records, {args.image_side}px JPEGs -> {base}/bench/catalog")
        paths = write_raw_catalogue(raw, n_train=args.records, n_val=0, seed=0, image_side=args.image_side)
        cat, tok = f"{base}/bench/catalog", f"{base}/bench/tokenizer"
        store.delete_dir(cat)
        res = prepare(paths["train"], cat, PrepareOptions(progress=False, row_group_size=args.row_group_size,
                                                          max_records_per_shard=8 * args.row_group_size), store)
        build_for_catalogue(cat, tok, res.manifest, vocab_size=1000, storage_cfg=store)
        units = units_from_manifest(res.manifest)
        d = cfg.data
        pp = PreprocessSpec(image_size=d.image_size, max_image_pixels=d.max_image_pixels,
                            max_text_tokens=d.max_text_tokens, max_text_chars=d.max_text_chars, augment=d.augment,
                            tokenizer_uri=tok, seed=0, epoch=0, with_aug_views=not args.no_aug, train=True,
                            jpeg_draft=d.jpeg_draft, image_background=d.image_background)
        settings = store.settings
        spec = StreamSpec(catalogue_uri=cat, units=tuple(units), preprocess=pp, settings=settings, shuffle=True,
                          batch_size=d.batch_size, preprocess_num_cpus=d.preprocess_num_cpus, prefetch_batches=d.prefetch_batches,
                          concurrency=d.preprocess_concurrency, segments_per_task=d.preprocess_segments_per_task)
        part = [Segment(u, 0, units[u].num_rows) for u in range(len(units))]

        result.update({"records": res.num_written, "cores": cores, "image_side": args.image_side,
                       "image_size": d.image_size, "augmented_views": not args.no_aug,
                       "row_group_size": args.row_group_size, "epochs_per_pass": args.epochs_per_pass,
                       "preprocess_num_cpus": d.preprocess_num_cpus,
                       "preprocess_segments_per_task": d.preprocess_segments_per_task,
                       "prefetch_batches": d.prefetch_batches})
        if args.rounds > 0:
            # bytes in memory for the limit: the same rows the stream reads, read once
            table = pa.concat_tables([read_segment_rows(cat, units[s.unit], s.unit, s.start, s.stop, 0, 0, True, settings,
                                                        pp.columns) for s in part])
            local_tok = stack.enter_context(tempfile.TemporaryDirectory(prefix="gammaray-bench-tok-"))
            store.download_dir(tok, local_tok)
            pp_local = PreprocessSpec(**{**pp.__dict__, "tokenizer_uri": local_tok})

            import ray

            if ray.is_initialized():
                ray.shutdown()
            ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd()),
                                               "TOKENIZERS_PARALLELISM": "false"}})
            say(f"warm-up: {cores} limit processes, {cores} DataLoader workers, Ray Data worker processes")
            limit = LimitRunner(table, pp_local, cores)
            stack.callback(limit.close)
            loader = make_dataloader(spec, part, cores)
            t_cold = time.perf_counter()
            cold_g, _ = run_gammaray(spec, part)
            result["gammaray_cold_start_s"] = round(time.perf_counter() - t_cold, 2)
            run_dataloader(loader)
            limit.run(1.0)

            rates: dict[str, list[float]] = {"gammaray": [], "dataloader": [], "limit": []}
            cpu_ms: dict[str, list[float]] = {"gammaray": [], "dataloader": [], "limit": []}
            order_rng = random.Random(0)
            last_pass_s = 3.0
            for r in range(args.rounds):
                # the three in a shuffled order each round: load from other programs that comes and
                # goes hits all three alike (and the median drops the outliers)
                order = ["gammaray", "dataloader", "limit"]
                order_rng.shuffle(order)
                for which in order:
                    if which == "gammaray":
                        (g, ng), cg = timed(run_gammaray, spec, part, args.epochs_per_pass)
                        last_pass_s = ng / max(g, 1.0)
                    elif which == "dataloader":
                        (dl, nd), cd = timed(run_dataloader, loader, args.epochs_per_pass)
                    else:
                        duration = max(1.0, last_pass_s)  # about as long as one pass
                        lim, cl = timed(limit.run, duration)
                        n_lim = lim * duration
                rates["gammaray"].append(g)
                rates["dataloader"].append(dl)
                rates["limit"].append(lim)
                for k, c, n in (("gammaray", cg, ng), ("dataloader", cd, nd), ("limit", cl, n_lim)):
                    cpu_ms[k].append(1000.0 * c / max(1.0, n))
                assert ng == nd == res.num_written * args.epochs_per_pass, (ng, nd, res.num_written)
                say(f"round {r + 1}/{args.rounds}: gammaray {g:7.0f}  dataloader {dl:7.0f}  limit {lim:7.0f} records/s"
                    f"   CPU ms/record {cpu_ms['gammaray'][-1]:.2f} / {cpu_ms['dataloader'][-1]:.2f} / "
                    f"{cpu_ms['limit'][-1]:.2f}  (load {os.getloadavg()[0]:.1f})")
            del loader
            ray.shutdown()

            med = {k: statistics.median(v) for k, v in rates.items()}
            result.update({
                "gammaray_records_per_s": round(med["gammaray"], 1),
                "dataloader_records_per_s": round(med["dataloader"], 1),
                "limit_records_per_s": round(med["limit"], 1),
                "gammaray_vs_limit": round(med["gammaray"] / med["limit"], 3),
                "gammaray_vs_dataloader": round(med["gammaray"] / med["dataloader"], 3),
                "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                "cpu_ms_per_record": {k: round(statistics.median(v), 3) for k, v in cpu_ms.items()},
                "load_average_1m": round(os.getloadavg()[0], 2),
            })

        if args.train_steps > 0:
            # the demo model on a prefix of the catalogue, so that a short run crosses epoch starts
            n_train = min(args.train_records, res.num_written)
            sub = f"{base}/bench/train-catalog"
            store.delete_dir(sub)
            with open(paths["train"]) as f, open(os.path.join(raw, "train-prefix.jsonl"), "w") as g:
                for _, line in zip(range(n_train), f):
                    g.write(line)
            prepare(os.path.join(raw, "train-prefix.jsonl"), sub, PrepareOptions(progress=False), store)
            say(f"training the demo model ({args.train_steps} steps, {n_train} records, up to {args.train_epochs} "
                f"epochs) for the data-stall fraction")
            result.update(run_training(cfg, store, sub, tok, f"{base}/bench/runs", args.train_steps, args.train_epochs))
            result["train_records"] = n_train
            import ray

            ray.shutdown()

    say("")
    say(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        say(f"written {args.json}")
    return 0


def format_table(r: dict) -> str:
    lines = [f"ingest benchmark: {r['records']} records, {r['cores']} cores, {r['image_side']}px JPEG -> "
             f"{r['image_size']}px{' + augmented views' if r['augmented_views'] else ''}"]
    if "rounds" in r:
        lines[0] += f", median of {len(r['rounds']['limit'])} rounds"
        lines += [f"  gammaray (Ray Data stream from S3)     {r['gammaray_records_per_s']:8.0f} records/s  "
                  f"({100 * r['gammaray_vs_limit']:.0f}% of limit, {r['gammaray_vs_dataloader']:.2f}x DataLoader)",
                  f"  torch DataLoader (num_workers={r['cores']:<2})     {r['dataloader_records_per_s']:8.0f} records/s",
                  f"  limit (tight loop, bytes in memory)    {r['limit_records_per_s']:8.0f} records/s"]
    if "data_stall_fraction" in r:
        lines.append(f"  data-stall fraction, demo model        {r['data_stall_fraction']:8.3f}  "
                     f"(incl. first window {r['data_stall_fraction_incl_start']:.3f}; step {r['train_step_time_s']:.3f} s)")
    return "\n".join(lines)
