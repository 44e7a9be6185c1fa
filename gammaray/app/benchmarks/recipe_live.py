"""The regimes of `gammaray bench recipe` in which the towers train (no cached features):

  finetune  the pretrained towers (EfficientNet-Lite0 + all-MiniLM-L6-v2) fine-tuned with the heads
  scratch   the project's small default towers (ResNet + BERT, random init) trained from scratch

Records come from the prepared catalogues through the project's preprocessing (the training
stream's spec: checked decode, resize, tokenize; no augmentation, as in the locked regime), held in
memory as arrays; the step is the library's (build_model, Objective, the engine's AdamW groups, warm-up
+ cosine schedule, clipping) in one process, as in workers/training/heads.py. Evaluation on the test split at
the end: R@1/R@5 both ways and zero-shot category accuracy (the category prompts through the model's
text tower).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

REGIMES = ("finetune", "scratch")


def live_base(regime: str, cache: str, tokenizer_dir: str | None = None):
    """The config of a live regime (everything not set here: the shipped defaults)."""
    from gammaray.config import load

    from gammaray.app.benchmarks.common import pretrained_towers

    if regime == "finetune":
        image, text = pretrained_towers(cache)
        return load(None, {"model.image.pretrained": image, "model.text.pretrained": text,
                           "model.text.pooling": "mean", "data.tokenizer": text, "data.image_size": 64,
                           "data.max_text_tokens": 32, "train.optim.lr": 1e-4})
    return load(None, {"data.tokenizer": tokenizer_dir, "data.image_size": 64, "data.max_text_tokens": 32})


def scratch_tokenizer(catalog_train: str, out_dir: str) -> str:
    from pipelines.prepare import load_manifest
    from pipelines.tokenizer import build_for_catalogue

    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        build_for_catalogue(catalog_train, out_dir, load_manifest(catalog_train), vocab_size=2000)
    return out_dir


def arrays(cfg, catalogue: str, out_path: str) -> str:
    """The catalogue's good records through the training stream's preprocessing (evaluation mode)
    as one .npz: uint8 pixels, token ids and masks, sample_index, category."""
    if os.path.exists(out_path):
        return out_path
    from gammaray.schema import BatchKeys as K
    from pipelines import storage
    from pipelines.prepare import load_manifest
    from pipelines.preprocess import preprocess_batch
    from pipelines.stream import read_segment_rows, units_from_manifest
    from pipelines.tokenizer import load as load_tokenizer
    from pipelines.preprocess import PreprocessSpec

    units = units_from_manifest(load_manifest(catalogue))
    spec = PreprocessSpec.from_config(cfg, epoch=0, train=False, with_aug=False)
    spec = dataclasses.replace(spec, pixels_uint8=True)
    store = storage.Store.of(cfg.storage)
    tok = load_tokenizer(spec.tokenizer_uri, store)
    parts: dict[str, list] = {k: [] for k in ("pixels", "ids", "mask", "index", "category")}
    for u, unit in enumerate(units):
        table = read_segment_rows(catalogue, unit, u, 0, unit.num_rows, 0, 0, False, store)
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        out = preprocess_batch(cols, spec, tok)
        ok = out[K.REJECT] == ""
        parts["pixels"].append(out[K.PIXELS][ok])
        parts["ids"].append(out[K.INPUT_IDS][ok])
        parts["mask"].append(out[K.ATTENTION_MASK][ok])
        parts["index"].append(out[K.SAMPLE_INDEX][ok])
        cats = dict(zip(cols["sample_index"].tolist(), cols["category"].tolist()))
        parts["category"].append(np.asarray([cats.get(int(i)) or "" for i in out[K.SAMPLE_INDEX][ok]], dtype=object))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    np.savez(out_path + ".tmp.npz", **{k: np.concatenate(v) for k, v in parts.items()})
    os.replace(out_path + ".tmp.npz", out_path)
    return out_path


def _load(path: str) -> dict[str, np.ndarray]:
    z = np.load(path, allow_pickle=True)   # our own file, written above (categories as strings)
    return {k: z[k] for k in z.files}


def _batch(data: dict, rows: np.ndarray, device):
    import torch

    from gammaray.schema import BatchKeys as K
    from pipelines.preprocess import normalise

    return {K.PIXELS: torch.from_numpy(normalise(data["pixels"][rows])).to(device),
            K.INPUT_IDS: torch.from_numpy(data["ids"][rows]).to(device),
            K.ATTENTION_MASK: torch.from_numpy(data["mask"][rows]).to(device),
            K.SAMPLE_INDEX: torch.from_numpy(data["index"][rows]).to(device)}


def evaluate_live(model, data: dict, cfg, tokenizer, device) -> dict[str, float]:
    import torch

    from gammaray.schema import BatchKeys as K
    from workers.evaluation.metrics import category_prompts, recall_at_k, retrieval_ranks, zero_shot_accuracy

    model.eval()
    img, txt = [], []
    with torch.no_grad():
        for s in range(0, len(data["index"]), 128):
            out = model(_batch(data, np.arange(s, min(len(data["index"]), s + 128)), device))
            img.append(out["image"].float())
            txt.append(out["text"].float())
        image, text = torch.cat(img), torch.cat(txt)
        res: dict[str, float] = {}
        i2t, t2i = recall_at_k(retrieval_ranks(image, text)), recall_at_k(retrieval_ranks(text, image))
        for k in (1, 5, 10):
            res[f"r_at_{k}"] = 0.5 * (i2t[k] + t2i[k])
        classes = sorted({c for c in data["category"] if c})
        if classes:
            enc = tokenizer(category_prompts(classes, cfg.eval.prompt_template), max_length=cfg.data.max_text_tokens,
                            truncation=True, padding="max_length", return_tensors="pt")
            class_text = model({K.INPUT_IDS: enc["input_ids"].to(device),
                                K.ATTENTION_MASK: enc["attention_mask"].to(device)})["text"].float()
            index = {c: i for i, c in enumerate(classes)}
            labels = np.asarray([index.get(c, -1) for c in data["category"]])
            keep = labels >= 0
            res["zero_shot_acc"] = zero_shot_accuracy(image[torch.from_numpy(keep)], class_text,
                                                      torch.from_numpy(labels[keep]))
    model.train()
    return res


def run_live_cell(job: dict) -> dict:
    """Train the towers and heads of one (regime, data set, loss, batch, seed) cell; test at the end."""
    import torch

    from gammaray.config import from_dict
    from pipelines.tokenizer import load as load_tokenizer
    from workers.training.engine import DDPEngine, optimizer_and_schedule
    from workers.models.registry import build_model
    from workers.training.objective import Objective
    from workers.training.step import train_step

    from gammaray.app.benchmarks.common import peak_rss, reset_peak_rss

    torch.set_num_threads(1)
    cfg = from_dict(job["config"])
    device = torch.device("cpu")
    train, test = _load(job["arrays"]["train"]), _load(job["arrays"]["test"])
    tok = load_tokenizer(cfg.data.tokenizer)
    base = reset_peak_rss()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id).to(device).train()
    N, B = len(train["index"]), int(cfg.data.batch_size)
    steps_per_epoch = -(-N // B)
    total = cfg.train.epochs * steps_per_epoch
    objective = Objective(cfg.loss, num_samples=int(train["index"].max()) + 1, seed=cfg.run.seed,
                          distributed=False, batch_size=B)
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total)
    engine = DDPEngine.local(model, optimizer, scheduler, cfg, device)
    step, t0 = 0, time.perf_counter()
    for epoch in range(cfg.train.epochs):
        order = np.random.default_rng([cfg.run.seed, epoch, 7]).permutation(N)
        for b in range(steps_per_epoch):
            batch = _batch(train, np.sort(order[b * B:(b + 1) * B]), device)
            train_step(engine, objective, batch, step / total)  # the training loop's step
            step += 1
    wall = time.perf_counter() - t0
    peak = peak_rss() - base
    final = evaluate_live(model, test, cfg, tok, device)
    return {"dataset": job["dataset"], "regime": job["regime"], "loss": job["loss"], "settings": job["settings"],
            "batch_size": B, "seed": cfg.run.seed, "epochs": cfg.train.epochs, "steps": step,
            "r_at_1": final["r_at_1"], "r_at_5": final["r_at_5"], "zero_shot_acc": final.get("zero_shot_acc"),
            "peak_mem_mb": round(peak / 2**20, 2), "wall_s": round(wall, 2), "_test": final, "_curve": []}
