"""`gammaray demo`: the whole path on one machine, on the real stack.

1. a SeaweedFS S3 server on 127.0.0.1 (unless a storage URL is given)
2. a synthetic catalogue with an image/text information gap, split train / held-out
3. `prepare` -> Parquet shards with sample_index in s3://.../catalog/{train,val}, and a tokenizer
4. Ray Data streams it into a Ray Train TorchTrainer (2 CPU workers, gloo, DeepSpeed ZeRO-1)
   training a tiny two-tower model under the gamma-augmented loss, micro-batch 16
5. checkpoints to s3://.../runs/, held-out retrieval R@1/5/10 and zero-shot accuracy
6. `embed` + `index` the held-out catalogue, then `search` it with two text queries (top 3 each)
7. a summary table (and --json)
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gammaray.config import GammarayConfig

if TYPE_CHECKING:
    from pipelines.storage import Store


@dataclass
class DemoOptions:
    storage: str | None = None     # s3://bucket/prefix or a local dir; None = start a local S3 server
    n_train: int = 3000
    n_val: int = 500
    bad_records: int = 10
    vocab_size: int = 1000
    json_path: str | None = None
    progress: bool = True
    # text queries searched in the held-out catalogue's image index at the end (colour + product)
    queries: tuple[str, ...] = ("red mug", "blue backpack")
    top_k: int = 3


def stage(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(cfg: GammarayConfig, opts: DemoOptions) -> dict:
    from pipelines import storage
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.synthetic import write_raw_catalogue
    from pipelines.tokenizer import build_for_catalogue

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if opts.storage is None:
            from infra.s3server import SeaweedS3

            stage("starting a local S3 server (SeaweedFS)")
            s3 = stack.enter_context(SeaweedS3(bucket="gammaray"))
            base = "s3://gammaray"
            print(f"   endpoint {s3.endpoint}, bucket s3://gammaray")
        else:
            base = opts.storage.rstrip("/")

        store = storage.Store.of(cfg.storage)  # bound once the server's endpoint is in the environment
        raw_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gammaray-raw-"))
        stage(f"generating a synthetic catalogue: {opts.n_train} train + {opts.n_val} held-out products "
              f"(+{opts.bad_records} deliberately broken records)")
        paths = write_raw_catalogue(raw_dir, n_train=opts.n_train, n_val=opts.n_val, seed=cfg.run.seed,
                                    bad_records=opts.bad_records)

        stage("gammaray prepare: validate, assign sample_index, write Parquet shards")
        popts = PrepareOptions(max_image_pixels=cfg.data.max_image_pixels, max_text_chars=cfg.data.max_text_chars,
                               max_image_bytes=cfg.data.max_image_bytes, progress=opts.progress)
        train_uri, val_uri = f"{base}/catalog/train", f"{base}/catalog/val"
        res_train = prepare(paths["train"], train_uri, popts, store)
        print(res_train.summary())
        res_val = prepare(paths["val"], val_uri, popts, store)
        print(res_val.summary())
        tok_uri = f"{base}/catalog/tokenizer"
        if not store.exists(storage.join(tok_uri, "tokenizer_config.json")):
            build_for_catalogue(train_uri, tok_uri, res_train.manifest, vocab_size=opts.vocab_size, storage_cfg=store)
        print(f"   tokenizer (WordPiece, {opts.vocab_size}) -> {tok_uri}")

        from gammaray.config import apply_overrides

        cfg = apply_overrides(cfg, {"data.train": train_uri, "data.val": val_uri, "data.tokenizer": tok_uri,
                                    "run.storage": f"{base}/runs"})
        stage(f"gammaray pretrain: Ray Train, {cfg.train.workers} workers x DeepSpeed ZeRO-{cfg.train.deepspeed.zero_stage}, "
              f"loss={cfg.loss.kind}, micro-batch {cfg.data.batch_size}, {cfg.train.epochs} epochs")
        from workers.training.trainer import pretrain

        result = pretrain(cfg, progress=opts.progress)
        m = result.metrics
        searches = search_held_out(store, result.checkpoint_uri, val_uri, f"{base}/embeddings/val", opts)

    summary = {
        "r_at_1_i2t": m.get("val_r_at_1_i2t"),
        "r_at_1_t2i": m.get("val_r_at_1_t2i"),
        "r_at_5_i2t": m.get("val_r_at_5_i2t"),
        "r_at_5_t2i": m.get("val_r_at_5_t2i"),
        "r_at_10_i2t": m.get("val_r_at_10_i2t"),
        "r_at_10_t2i": m.get("val_r_at_10_t2i"),
        "zero_shot_acc": m.get("val_zero_shot_acc"),
        "zero_shot_chance": m.get("val_zero_shot_chance"),
        "chance_r_at_1": m.get("val_chance_r_at_1"),
        "modality_gap": m.get("val_modality_gap"),
        "records_trained": res_train.num_written - int(m.get("records_quarantined_stream", 0)),
        "samples_seen": m.get("samples_seen_total"),
        "loss": m.get("loss"),                 # mean over the last epoch's records, all workers
        "loss_epoch": m.get("loss_epoch"),
        "loss_records": m.get("loss_records"),
        "records_quarantined": res_train.num_quarantined + int(m.get("records_quarantined_stream", 0)),
        "quarantine_by_reason": res_train.quarantine_by_reason,
        "val_records": m.get("val_records"),
        "steps": m.get("step"),
        "checkpoint": result.checkpoint_uri,
        "search": searches,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    stage("summary")
    print(format_summary(summary))
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"   written {opts.json_path}")
    return summary


def search_held_out(store: Store, checkpoint_uri: str, val_uri: str, out_uri: str, opts: DemoOptions) -> list[dict]:
    """Embed the held-out catalogue, index its image embeddings, and look up each text query: the
    path a user takes from a trained encoder to product search (gammaray embed / index / search)."""
    from workers.evaluation.embed import EmbedOptions, embed_catalogue
    from workers.evaluation.index import OpenIndex, build_index
    from workers.evaluation.query import QueryEncoder

    stage(f"gammaray embed + index + search: the held-out catalogue, {len(opts.queries)} text queries")
    emb = embed_catalogue(checkpoint_uri, val_uri, out_uri, EmbedOptions(progress=opts.progress), storage_cfg=store)
    print(f"   embedded {emb.records_written} held-out products -> {out_uri}")
    built = build_index(out_uri, field_name="image", storage_cfg=store)
    print(f"   {built.kind} index of {built.count} image embeddings -> {built.out_uri}")
    index = OpenIndex(built.out_uri, store)
    encoder = QueryEncoder(checkpoint_uri, store)
    index.check_model(encoder.fingerprint, f"({checkpoint_uri})")
    found = []
    for query in opts.queries:
        hits = index.search(encoder.encode_query(query), opts.top_k)[0]
        print(f'   "{query}":')
        for h in hits:
            print(f"     {h.rank}. {h.score:.3f}  {h.product_id:<12} {h.title or ''}")
        found.append({"query": query, "hits": [{"product_id": h.product_id, "title": h.title, "score": round(h.score, 4)}
                                               for h in hits]})
    return found


def format_summary(s: dict) -> str:
    def f(v, d=3):
        return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    chance = s.get("chance_r_at_1") or 0
    rows = [
        ("held-out retrieval", "image->text", "text->image"),
        ("R@1", f(s["r_at_1_i2t"]), f(s["r_at_1_t2i"])),
        ("R@5", f(s["r_at_5_i2t"]), f(s["r_at_5_t2i"])),
        ("R@10", f(s["r_at_10_i2t"]), f(s["r_at_10_t2i"])),
        ("R@1 / chance", f((s["r_at_1_i2t"] or 0) / chance if chance else None, 1),
         f((s["r_at_1_t2i"] or 0) / chance if chance else None, 1)),
    ]
    lines = [f"   {a:<20} {b:>12} {c:>12}" for a, b, c in rows]
    lines += [
        f"   zero-shot category accuracy  {f(s['zero_shot_acc'])}  (chance {f(s['zero_shot_chance'])})",
        f"   chance R@1                   {f(s['chance_r_at_1'], 4)}  ({s['val_records']} held-out records)",
        f"   records trained              {s['records_trained']}  ({s['samples_seen']} samples seen, {s['steps']} steps)",
        f"   training loss                {f(s.get('loss'), 4)}  (mean over the {s.get('loss_records')} records of epoch "
        f"{s.get('loss_epoch')}, all workers)",
        f"   records quarantined          {s['records_quarantined']}  {s['quarantine_by_reason']}",
        f"   checkpoint                   {s['checkpoint']}",
        f"   wall time                    {s['wall_s']} s",
    ]
    return "\n".join(lines)
