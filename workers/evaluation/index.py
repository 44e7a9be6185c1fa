"""`gammaray index`: a FAISS nearest-neighbour index over one embedding column of an embedded
catalogue (the output of `gammaray embed`), stored beside it with the identity of the model and
catalogue it belongs to.

The kind of index follows one rule (`plan_index`, documented in docs/using-the-encoder.md):

    n <= flat_max (50,000)   exact inner product over every vector (IndexFlatIP)
    n >  flat_max            IVF-PQ: nlist = the power of two nearest 2*sqrt(n) coarse cells,
                             m = d/4 sub-quantizers of 8 bits (16x smaller than float32),
                             nprobe = max(8, nlist/32) cells scanned per query, and the
                             k * refine candidates the codes find re-ranked by the exact vectors

The coarse quantizer and the PQ codebooks are trained on a uniform sample of max(40*nlist, 10,000)
vectors; the vectors are then added shard by shard. With `parallel` each embeddings file is added in
its own Ray task to a copy of the trained empty index, and the driver merges the inverted lists
(faiss `merge_from`), so the cost of adding grows over the cluster's CPUs, not one process.

Layout of OUT (default EMBEDDINGS/index-<field>):
    index.faiss       the serialised FAISS index (row i = items row i)
    items.parquet     row -> product_id, sample_index, title
    index.json        kind, parameters, column, dim, count, model fingerprint, checkpoint, catalogue
Vectors are L2-normalised before they are added, so scores are cosine similarities.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.config import StorageConfig
from pipelines import storage
from pipelines.storage import Store

FORMAT = 1
FLAT_MAX = 50_000


@dataclass(frozen=True)
class IndexPlan:
    kind: str                 # "flat" | "ivfpq"
    nlist: int = 0            # coarse cells (ivfpq)
    m: int = 0                # PQ sub-quantizers (ivfpq)
    nbits: int = 8            # bits per sub-quantizer code
    nprobe: int = 0           # cells scanned per query
    refine: int = 4           # candidates per wanted result re-ranked exactly (0: none)
    train_size: int = 0       # vectors the quantizers are trained on


def plan_index(n: int, d: int, flat_max: int = FLAT_MAX) -> IndexPlan:
    """The documented rule: exact below `flat_max` vectors, IVF-PQ with re-ranking above."""
    if n <= flat_max:
        return IndexPlan(kind="flat")
    nlist = 2 ** max(4, round(math.log2(2 * math.sqrt(n))))
    m = next(m for m in (d // 4, d // 2, d) if m >= 1 and d % m == 0)
    nbits = 8 if n >= 40 * 256 else 4  # PQ needs ~39 training vectors per code word
    train = min(n, max(40 * nlist, 10_000))
    return IndexPlan(kind="ivfpq", nlist=nlist, m=m, nbits=nbits, nprobe=max(8, nlist // 32), refine=4,
                     train_size=train)


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def empty_index(plan: IndexPlan, d: int):
    import faiss

    if plan.kind == "flat":
        return faiss.IndexFlatIP(d)
    quantizer = faiss.IndexFlatIP(d)
    return faiss.IndexIVFPQ(quantizer, d, plan.nlist, plan.m, plan.nbits, faiss.METRIC_INNER_PRODUCT)


def trained_index(plan: IndexPlan, sample: np.ndarray):
    idx = empty_index(plan, sample.shape[1])
    if plan.kind != "flat":
        idx.train(normalised(sample))
    return idx


def serialize(idx) -> bytes:
    import faiss

    return faiss.serialize_index(idx).tobytes()


def deserialize(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def finish(idx, plan: IndexPlan, vectors: np.ndarray | None):
    """The searchable index: IVF-PQ wrapped in an exact re-ranking stage over `vectors` (all rows,
    in row order), nprobe set."""
    import faiss

    if plan.kind == "flat":
        return idx
    idx.nprobe = plan.nprobe
    if not plan.refine:
        return idx
    refine = faiss.IndexFlatIP(idx.d)
    refine.add(normalised(vectors))
    out = faiss.IndexRefine(idx, refine)
    out.k_factor = float(plan.refine)
    return out


def add_shard(index_bytes: bytes, uri: str, column: str, start: int, store: Store) -> bytes:
    """[Ray task] One embeddings file added to a copy of the trained empty index, ids from `start`."""
    idx = deserialize(index_bytes)
    vec = read_vectors(uri, column, store)
    idx.add_with_ids(normalised(vec), np.arange(start, start + len(vec), dtype=np.int64))
    return serialize(idx)


def read_vectors(uri: str, column: str, store: Store) -> np.ndarray:
    fs, path = store.resolve(uri)
    t = pq.read_table(path, filesystem=fs, columns=[column])
    col = t.column(column).combine_chunks()
    if len(col) == 0:
        return np.zeros((0, col.type.list_size), np.float32)
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32, copy=False)


@dataclass
class IndexResult:
    out_uri: str
    kind: str
    count: int
    dim: int
    column: str
    plan: dict
    parallel: bool
    wall_s: float
    shards: int = 0
    meta: dict = field(default_factory=dict)

    def summary(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.plan.items() if v and k != "kind") if self.kind != "flat" else ""
        return "\n".join([f"indexed {self.out_uri}",
                          f"  vectors   {self.count} x {self.dim} ({self.column})",
                          f"  index     {self.kind}{' (' + p + ')' if p else ''}",
                          f"  built     {'in parallel Ray tasks, ' if self.parallel else ''}{self.shards} shards, "
                          f"{self.wall_s:.1f} s"])


def default_out(embeddings_uri: str, column: str) -> str:
    return storage.join(embeddings_uri, f"index-{column.removesuffix('_embedding')}")


def build_index(embeddings_uri: str, out_uri: str | None = None, field_name: str = "image",
                storage_cfg: Store | StorageConfig | None = None, flat_max: int = FLAT_MAX, plan: IndexPlan | None = None,
                parallel: bool | None = None, with_titles: bool = True, seed: int = 0) -> IndexResult:
    """Index column `<field_name>_embedding` of an embedded catalogue. `parallel`: add the shards in
    Ray tasks (None: when the index is IVF-PQ and there is more than one shard)."""
    t0 = time.perf_counter()
    store = Store.of(storage_cfg)
    meta_uri = storage.join(embeddings_uri, "_embed.json")
    if not store.exists(meta_uri):
        raise FileNotFoundError(f"{embeddings_uri} is not an embedded catalogue (no _embed.json): run gammaray embed first")
    emb_meta = store.read_json(meta_uri)
    if emb_meta.get("kind", "embeddings") != "embeddings":
        raise ValueError(f"{embeddings_uri} holds tower features (embed --features), not embeddings: nothing to search")
    column = field_name if field_name.endswith("_embedding") else f"{field_name}_embedding"
    if column not in emb_meta["columns"]:
        raise ValueError(f"{embeddings_uri} has no column {column!r}; it has {emb_meta['columns']}")
    out_uri = out_uri or default_out(embeddings_uri, column)
    files = store.list_files(storage.join(embeddings_uri, "embeddings"), ".parquet")
    if not files:
        raise FileNotFoundError(f"{embeddings_uri}/embeddings holds no Parquet files")
    counts, ids, sample_idx = [], [], []
    for f in files:
        fs, path = store.resolve(f)
        t = pq.read_table(path, filesystem=fs, columns=["product_id", "sample_index"])
        counts.append(t.num_rows)
        ids.append(t.column("product_id"))
        sample_idx.append(t.column("sample_index"))
    n = int(sum(counts))
    d = int(emb_meta["dims"][column.removesuffix("_embedding")])
    plan = plan or plan_index(n, d, flat_max)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()

    vectors = np.concatenate([read_vectors(f, column, store) for f in files]) if (
        plan.kind == "flat" or plan.refine or not parallel) else None
    if plan.kind == "flat":
        idx = trained_index(plan, vectors[:1])
        idx.add(normalised(vectors))
        parallel = False
    else:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(n, size=min(plan.train_size, n), replace=False))
        sample = vectors[pick] if vectors is not None else _sample_rows(files, column, starts, counts, pick, store)
        empty = trained_index(plan, sample)
        if parallel is None:
            parallel = len(files) > 1
        if parallel:
            import ray

            from gammaray.config import GammarayConfig
            from workers.cluster import ensure_ray

            ensure_ray(GammarayConfig())
            blob = ray.put(serialize(empty))
            task = ray.remote(num_cpus=1)(add_shard)
            refs = [task.remote(blob, f, column, s, store) for f, s in zip(files, starts)]
            idx = empty
            for part in ray.get(refs):  # merged in shard order: the same lists as adding sequentially
                idx.merge_from(deserialize(part), 0)
        else:
            idx = empty
            idx.add_with_ids(normalised(vectors), np.arange(n, dtype=np.int64))
    searchable = finish(idx, plan, vectors)

    items = {"product_id": pa.concat_arrays([c.combine_chunks() for c in ids]).cast(pa.string()),
             "sample_index": pa.concat_arrays([c.combine_chunks() for c in sample_idx])}
    titles = read_titles(emb_meta["data"], items["sample_index"].to_numpy(), store) if with_titles else [None] * n
    items["title"] = pa.array(titles, pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(items), buf, compression="zstd")

    meta = {"format": FORMAT, "kind": plan.kind, "plan": asdict(plan), "column": column, "dim": d, "count": n,
            "metric": "cosine", "model_fingerprint": emb_meta["model_fingerprint"],
            "checkpoint": emb_meta["checkpoint"], "data": emb_meta["data"], "embeddings": embeddings_uri.rstrip("/"),
            "image_size": emb_meta.get("image_size"), "max_text_tokens": emb_meta.get("max_text_tokens")}
    store.write_bytes(storage.join(out_uri, "index.faiss"), serialize(searchable))
    store.write_bytes(storage.join(out_uri, "items.parquet"), buf.getvalue())
    store.write_json(storage.join(out_uri, "index.json"), meta)  # last: marks the index complete
    return IndexResult(out_uri=out_uri, kind=plan.kind, count=n, dim=d, column=column,
                       plan={k: v for k, v in asdict(plan).items()}, parallel=bool(parallel),
                       wall_s=time.perf_counter() - t0, shards=len(files), meta=meta)


def _sample_rows(files, column, starts, counts, pick, store: Store) -> np.ndarray:
    out = []
    for f, s, c in zip(files, starts, counts):
        local = pick[(pick >= s) & (pick < s + c)] - s
        if local.size:
            out.append(read_vectors(f, column, store)[local])
    return np.concatenate(out)


def read_titles(catalogue_uri: str, sample_index: np.ndarray, store: Store) -> list[str | None]:
    """The titles of the indexed records, by sample_index, from the prepared catalogue."""
    from pipelines.prepare import load_manifest

    manifest = load_manifest(catalogue_uri, store)
    found: dict[int, str] = {}
    for shard in manifest["shards"]:
        fs, path = store.resolve(storage.join(catalogue_uri, shard["path"]))
        t = pq.read_table(path, filesystem=fs, columns=["sample_index", "title"])
        found.update(zip(t.column("sample_index").to_pylist(), t.column("title").to_pylist()))
    missing = [int(i) for i in sample_index if int(i) not in found]
    if missing:
        raise ValueError(f"catalogue {catalogue_uri} has no record with sample_index {missing[:5]} "
                         f"({len(missing)} indexed rows): the embeddings belong to another catalogue")
    return [found[int(i)] for i in sample_index]


# --------------------------------------------------------------------------------------------
# opening and querying


@dataclass
class Hit:
    rank: int
    product_id: str
    title: str | None
    score: float
    sample_index: int


def read_index_meta(uri: str, store: Store) -> dict:
    """index.json of a stored index (what it holds, the model it belongs to), without loading the index."""
    meta_uri = storage.join(uri, "index.json")
    if not store.exists(meta_uri):
        raise FileNotFoundError(f"{uri} is not a gammaray index (no index.json): build one with gammaray index")
    return store.read_json(meta_uri)


def check_index_model(meta: dict, uri: str, fingerprint: str, what: str) -> None:
    """Refuse a query model other than the one whose embeddings the index holds: its vectors live in another space."""
    if fingerprint != meta["model_fingerprint"]:
        raise ValueError(f"index {uri} was built from embeddings of model {meta['model_fingerprint']} "
                         f"({meta['checkpoint']}); the query model {what} is {fingerprint}: embed the "
                         f"catalogue with that model and index it, or query with the index's own model")


class OpenIndex:
    """A stored index, loaded: `search(vectors, k)` -> one list of hits per query vector."""

    def __init__(self, uri: str, store: Store | StorageConfig | None = None):
        self.uri = uri
        self.store = store = Store.of(store)
        self.meta = read_index_meta(uri, store)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{uri}: index format {self.meta.get('format')!r}, this gammaray reads {FORMAT}")
        self.index = deserialize(store.read_bytes(storage.join(uri, "index.faiss")))
        if self.meta["kind"] != "flat":
            ivf = self._ivf()
            ivf.nprobe = self.meta["plan"]["nprobe"]
        items = pq.read_table(storage.buffer(store.read_bytes(storage.join(uri, "items.parquet"))))
        self.product_id = items.column("product_id").to_pylist()
        self.title = items.column("title").to_pylist()
        self.sample_index = items.column("sample_index").to_pylist()
        if self.index.ntotal != len(self.product_id) or self.index.ntotal != self.meta["count"]:
            raise ValueError(f"{uri}: index.faiss holds {self.index.ntotal} vectors, items.parquet "
                             f"{len(self.product_id)}, index.json {self.meta['count']}: a damaged index, rebuild it")

    def _ivf(self):
        import faiss

        base = self.index.base_index if hasattr(self.index, "base_index") else self.index
        return faiss.downcast_index(base)

    def check_model(self, fingerprint: str, what: str) -> None:
        check_index_model(self.meta, self.uri, fingerprint, what)

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        q = normalised(np.atleast_2d(vectors))
        if q.shape[1] != self.meta["dim"]:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, the index {self.meta['dim']}")
        k = max(1, min(int(k), self.index.ntotal))
        scores, rows = self.index.search(q, k)
        return [[Hit(rank=r + 1, product_id=self.product_id[i], title=self.title[i], score=float(s),
                     sample_index=int(self.sample_index[i]))
                 for r, (i, s) in enumerate(zip(row, sc)) if i >= 0]
                for row, sc in zip(rows, scores)]


def hits_json(hits: list[Hit]) -> str:
    return json.dumps([asdict(h) for h in hits])
