"""Heads trained on cached tower features: the locked-towers regime (LiT; open_clip's --lock-image
--lock-text) in one process.

When both towers are locked and their inputs are not augmented, a record's pooled tower outputs never
change, so they are computed once (`gammaray embed --features`, Ray Data) and only the projection
heads and the temperature train, here, on the vectors held in memory: thousands of records/s on a
CPU, no Ray Train, no DeepSpeed (a few linear layers do not need them). The step is the same as in the
distributed loop: the same model class (`TwoTowerModel` without towers), the same `Objective` (every
contrastive loss, its per-sample state), the same AdamW groups, warm-up + cosine schedule and
gradient clipping (workers/training/engine.py).

    for epoch: for batch in seeded permutation:
        out = model(features); terms = objective(out, batch, progress); backward; clip; step

It evaluates on a held-out feature store (workers/evaluation/heads.py: R@1/5/10 both ways, zero-shot
from the store's prompt features) and, for the gamma and SogCLR losses, compares the per-sample memory with the exact
partition function under the current model on a fixed probe subset of the training set
(`gamma/log_memory_over_exact_*`): how stale and how noisy the memory is.

`workers.training.trainer.pretrain_heads` (what `gammaray pretrain` runs when `data.features.train`
is set) keeps per-epoch state in the run folder (a rerun resumes), the model (the store's towers + the trained heads) exported
like a Ray Train checkpoint, so `gammaray eval/embed/export` take it.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from gammaray.config import GammarayConfig
from gammaray.schema import BatchKeys as K
from pipelines import storage
from pipelines.storage import Store
from pipelines.tokenizer import load as load_tokenizer
from workers.batches import distinct_indices
from workers.evaluation.export import open_checkpoint
from workers.evaluation.features import FeatureSet
from workers.evaluation.heads import embed_features, evaluate_heads, feature_tensors
from workers.models.registry import load_model, save_model
from workers.models.two_tower import TwoTowerModel
from workers.training.engine import DDPEngine, optimizer_and_schedule, use_bf16
from workers.training.objective import Objective
from workers.training.step import scalars, train_step


STATE_FILE = "heads_state.pt"


@dataclass
class HeadsResult:
    metrics: dict[str, float]               # the last evaluation + the last step's loss terms
    history: list[dict[str, float]]         # every evaluation, in order
    model: TwoTowerModel                    # heads only
    steps: int
    epochs: int
    samples: int                            # samples trained (every record once per epoch)
    wall_s: float
    train_s: float                          # time in training steps (evaluation excluded)
    resumed_from_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)   # the evaluation with the highest val R@1


@torch.no_grad()
def memory_diagnostics(objective: Objective, model: TwoTowerModel, train: dict[str, torch.Tensor],
                       probe: torch.Tensor) -> dict[str, float]:
    """log(R_i / Z_i) on the probe anchors: the memory against the exact partition function of the
    negatives-only objective (include_positive adds the positive) under the current model, over the
    whole training set. SogCLR's memory is relative to the positive: compared with Z_i / exp(s_ii)."""
    gamma = objective.gamma
    if gamma is None:
        return {}
    s = gamma.settings
    image, text = embed_features(model, train)
    scale = float(model.logit_scale())
    n = image.shape[0]
    rates = gamma.log_rates(train[K.SAMPLE_INDEX][probe], scale)                 # [P, 2]
    out: dict[str, float] = {}
    ratios = []
    for d, (anchors, cands) in enumerate(((image, text), (text, image))):
        logits = scale * anchors[probe].double() @ cands.double().T              # [P, N]
        pos = logits[torch.arange(probe.numel()), probe]
        counted = torch.ones_like(logits, dtype=torch.bool)
        if not s.include_positive:
            counted[torch.arange(probe.numel()), probe] = False
        log_z = torch.logsumexp(logits.masked_fill(~counted, -math.inf), 1) - math.log(max(1, n - (not s.include_positive)))
        if s.estimator == "sogclr":
            log_z = log_z - pos
        r = rates[:, d] - log_z
        ratios.append(r[~torch.isnan(r)])
    r = torch.cat(ratios)
    if r.numel():
        out["gamma/log_memory_over_exact_mean"] = float(r.mean())
        out["gamma/log_memory_over_exact_std"] = float(r.std()) if r.numel() > 1 else 0.0
        out["gamma/log_memory_over_exact_abs"] = float(r.abs().mean())
    out["gamma/probe_visited_fraction"] = float(r.numel()) / (2 * max(1, probe.numel()))
    return out


def _save_state(uri: str, state: dict, store: Store) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    store.write_bytes(uri, buf.getvalue())


def _load_state(uri: str, store: Store) -> dict | None:
    if not store.exists(uri):
        return None
    try:
        return torch.load(io.BytesIO(store.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a file that is not plain tensors and numbers is refused
        raise ValueError(f"{uri}: not a heads state this version can load safely ({type(err).__name__}: "
                         f"{str(err)[:200]}); start a new run (another run.name)") from None


def train_heads(cfg: GammarayConfig, train: FeatureSet, val: FeatureSet | None = None, *,
                report: Callable[[dict[str, float]], None] | None = None, progress: bool = False,
                device: torch.device | str = "cpu", state_uri: str | None = None, store: Store | None = None,
                diagnostics: bool = True, probe_size: int = 256) -> HeadsResult:
    """Train the heads of `cfg.model` on cached features for `cfg.train.epochs` (or max_steps).

    Evaluates on `val` every `cfg.train.eval_every` steps (None: every epoch) and at the end; each
    evaluation goes to `report` (Ray Tune's reporter in a trial). `state_uri`: saved every epoch (in
    `store`), a rerun resumes from the last saved epoch."""
    if state_uri and store is None:
        raise ValueError("train_heads: a state_uri needs the store it is in")
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(cfg.run.seed)
    model = TwoTowerModel(cfg.model, feature_widths=train.widths).to(device).train()
    objective = Objective(cfg.loss, num_samples=int(train.sample_index.max()) + 1, seed=cfg.run.seed,
                          device=device, distributed=False, batch_size=int(cfg.data.batch_size))
    data = feature_tensors(train, device)
    # every batch is rows of a permutation: its indices are distinct when the split's are (host array)
    distinct = distinct_indices(train.sample_index)
    val_data = feature_tensors(val, device) if val is not None else None
    N, B = len(train), int(cfg.data.batch_size)
    steps_per_epoch = -(-N // B)
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    on_gpu = device.type == "cuda"
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total, on_gpu)
    engine = DDPEngine.local(model, optimizer, scheduler, cfg, device, bf16=use_bf16(cfg, on_gpu))
    probe = torch.from_numpy(np.random.default_rng([cfg.run.seed, 11]).permutation(N)[:probe_size]).to(device)

    step, first_epoch, history, last, samples = 0, 0, [], {}, 0
    terms = None
    saved = _load_state(state_uri, store) if state_uri else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        loss = saved["loss"]
        # written before 2026-12-07 as the gamma memory's own dict, which the resume then skipped
        objective.load_state_dict({"gamma": loss} if "image_to_text" in loss else loss)
        step, first_epoch, history = int(saved["step"]), int(saved["epoch"]), list(saved["history"])
        samples = int(saved["samples"])

    def evaluate_now(epoch: int) -> dict[str, float]:
        m: dict[str, float] = {"step": float(step), "epoch": float(epoch), **last}
        if step >= total:
            m["final"] = 1.0
        if val is not None:
            m.update({f"val_{k}": v for k, v in evaluate_heads(model, val, device, val_data).items()})
        if diagnostics:
            m.update(memory_diagnostics(objective, model, data, probe))
        history.append(m)
        if report is not None:
            report(m)
        return m

    bar = tqdm(total=total, initial=step, desc="heads", unit="step", disable=not progress, mininterval=1.0)
    eval_every = cfg.train.eval_every
    train_s = 0.0
    epoch = first_epoch
    for epoch in range(first_epoch, cfg.train.epochs):
        if step >= total:
            break
        rng = np.random.default_rng([cfg.run.seed, epoch, 7])
        order = torch.from_numpy(rng.permutation(N) if cfg.data.shuffle else np.arange(N)).to(device)
        t_epoch = time.perf_counter()
        for b in range(steps_per_epoch):
            rows = order[b * B:(b + 1) * B]
            batch = {k: v[rows] for k, v in data.items()}
            batch[K.SAMPLE_INDEX_DISTINCT] = distinct  # type: ignore[assignment]
            terms = train_step(engine, objective, batch, step / max(1, total))
            step += 1
            samples += int(rows.shape[0])
            bar.update(1)
            if eval_every is not None and step % eval_every == 0 or step == total:
                last = terms.scalars()
                train_s += time.perf_counter() - t_epoch
                m = evaluate_now(epoch)
                t_epoch = time.perf_counter()
                bar.set_postfix_str(f"loss={last['loss']:.3f} val_R@1={m.get('val_r_at_1', float('nan')):.3f}")
            if step >= total:
                break
        last = scalars(terms)
        train_s += time.perf_counter() - t_epoch
        if eval_every is None and (not history or history[-1]["step"] != step):
            m = evaluate_now(epoch)
            bar.set_postfix_str(f"loss={last['loss']:.3f} val_R@1={m.get('val_r_at_1', float('nan')):.3f}")
        if state_uri:
            _save_state(state_uri, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "loss": objective.state_dict(),
                                    "step": step, "epoch": epoch + 1, "samples": samples, "history": history}, store)
    bar.close()
    final = dict(history[-1]) if history else {"step": float(step)}
    best = max(history, key=lambda m: m.get("val_r_at_1", -1.0)) if history else {}
    return HeadsResult(metrics=final, history=history, model=model, steps=step, epochs=epoch + 1, samples=samples,
                       wall_s=time.perf_counter() - t0, train_s=train_s, resumed_from_epoch=first_epoch, best=best)


# --------------------------------------------------------------------------------------------
# `gammaray pretrain` with data.features.train


def export_heads(model: TwoTowerModel, train: FeatureSet, cfg: GammarayConfig, store: Store, out_uri: str) -> str:
    """The feature store's towers + the trained heads as OUT/model + OUT/config.json: what a Ray
    Train checkpoint holds, so `gammaray eval/embed/export` open it."""
    with tempfile.TemporaryDirectory(prefix="gammaray-heads-") as tmp:
        features = open_checkpoint(train.uri, store, local_dir=os.path.join(tmp, "towers"))
        full = load_model(features.model_dir)
        missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith(("image_tower.", "text_tower.")) for k in missing):
            raise ValueError(f"heads do not fit the feature store's model (missing {missing}, unexpected {unexpected})")

        tok = load_tokenizer(os.path.join(features.model_dir, "text_tower"))
        model_cfg = cfg.model.model_copy(update={"image": features.cfg.model.image, "text": features.cfg.model.text})
        save_model(full, os.path.join(tmp, "model"), model_cfg, tok)
        store.upload_dir(os.path.join(tmp, "model"), storage.join(out_uri, "model"))
    saved = cfg.model_copy(update={"model": model_cfg})
    store.write_json(storage.join(out_uri, "config.json"), saved.model_dump(mode="json"))
    return out_uri


