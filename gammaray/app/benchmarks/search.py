"""`gammaray bench search`: the index `gammaray index` builds by its rule (workers/evaluation/index.py)
against exact search, at catalogue sizes where the rule picks IVF-PQ.

Per size: synthetic unit vectors drawn from a mixture of --clusters Gaussian clusters (embeddings of a
catalogue are clustered; uniform noise has no neighbours worth finding), queries = held-out vectors of
the same mixture. Exact = IndexFlatIP over every vector; ANN = the planned index (IVF-PQ trained on
its sample, codes re-ranked by the exact vectors). Reported: recall@10 of the ANN top 10 against the
exact top 10, queries/s of both for one batch of --queries queries on --threads threads, build time
and bytes per vector. The same functions as `gammaray index` (trained_index / finish), in memory:
the Ray-task shard path is tested for equality with this one in tests/test_eval_search.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from gammaray.app.benchmarks.common import markdown_table

COLUMNS = ["vectors", "dim", "index", "recall@10", "exact q/s", "ANN q/s", "ANN / exact", "build s",
           "bytes / vector"]


def mixture(n: int, d: int, clusters: int, rng: np.random.Generator, centres: np.ndarray | None = None):
    if centres is None:
        centres = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32), centres


def measure(n: int, d: int, queries: int, clusters: int, seed: int = 0) -> dict:
    import faiss

    from workers.evaluation.index import empty_index, finish, normalised, plan_index, serialize, trained_index

    rng = np.random.default_rng(seed)
    x, centres = mixture(n, d, clusters, rng)
    x = normalised(x)
    q = normalised(mixture(queries, d, clusters, rng, centres)[0])
    plan = plan_index(n, d, flat_max=0)

    exact = empty_index(plan_index(1, d), d)
    exact.add(x)
    t0 = time.perf_counter()
    _, truth = exact.search(q, 10)
    exact_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    sample = x[np.sort(rng.choice(n, size=plan.train_size, replace=False))]
    ivf = trained_index(plan, sample)
    train_s = time.perf_counter() - t0
    ivf.add_with_ids(x, np.arange(n, dtype=np.int64))
    ann = finish(ivf, plan, x)
    build_s = time.perf_counter() - t0
    ann.search(q[:10], 10)  # warm-up
    t0 = time.perf_counter()
    _, got = ann.search(q, 10)
    ann_s = time.perf_counter() - t0
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))
    size = len(serialize(ann))
    del exact, ann, ivf
    return {"vectors": n, "dim": d, "plan": {k: v for k, v in vars(plan).items()}, "queries": queries,
            "recall_at_10": round(recall, 4), "exact_qps": round(queries / exact_s, 1), "ann_qps": round(queries / ann_s, 1),
            "ann_vs_exact": round(exact_s / ann_s, 2), "train_s": round(train_s, 2), "build_s": round(build_s, 2),
            "bytes_per_vector": round(size / n, 1), "faiss": faiss.__version__}


def table_rows(data: dict) -> list[list[str]]:
    rows = []
    for r in data["rows"]:
        p = r["plan"]
        rows.append([f"{r['vectors']:,}", str(r["dim"]), f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}, nprobe {p['nprobe']}, "
                     f"re-rank {p['refine']}x", f"{r['recall_at_10']:.3f}", f"{r['exact_qps']:,.0f}",
                     f"{r['ann_qps']:,.0f}", f"{r['ann_vs_exact']:.1f}x", f"{r['build_s']:.1f}",
                     f"{r['bytes_per_vector']:.0f}"])
    return rows


def markdown(data: dict) -> str:
    return (markdown_table(COLUMNS, table_rows(data)) + "\n\n"
            f"*{data['setting']}. Command: `{data['command']}`. Source: `docs/bench/search.json`.*")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="100000,1000000", help="catalogue sizes, comma separated (default %(default)s)")
    p.add_argument("--dim", type=int, default=64, help="vector dimension (default 64: model.embed_dim's default)")
    p.add_argument("--queries", type=int, default=1000, help="queries per size, one batch (default %(default)s)")
    p.add_argument("--clusters", type=int, default=1000, help="clusters of the synthetic mixture (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="FAISS threads (default 1: comparable on a shared machine)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def run(args: argparse.Namespace) -> int:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.append(measure(n, args.dim, args.queries, args.clusters))
        print(json.dumps(rows[-1]), flush=True)
    data = {"command": "gammaray bench search " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                           if k not in ("json",) and v is not None),
            "setting": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
                       f"jobs (loaded), {args.threads} FAISS thread(s), {args.queries} queries in one batch, "
                       f"{args.clusters}-cluster Gaussian mixture, faiss {faiss.__version__}",
            "rows": rows}
    print(markdown(data))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0
