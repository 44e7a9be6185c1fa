"""The in-process trial (`tune.trial_kind: in_process`): a plain Ray Tune function trainable that trains
the trial's config in its own process with workers/training/inprocess.py (the same model, objective, AdamW
groups, schedule and clipping as the training loop; the data in memory, preprocessed by the code of the
Ray Data tasks) and reports the loop's validation metrics every train.eval_every steps.

No TorchTrainer, no Ray Data pipeline, no DeepSpeed: a trial costs its training and nothing else, which
is what makes a search of tens of trials of a small model affordable on a few CPU cores. What it does
not exercise (distributed data parallelism, streaming ingest, checkpoints) the train_loop trials do;
an interrupted in-process trial starts again from step 0 when the experiment resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from gammaray.config import GammarayConfig, from_dict
from pipelines.storage import Store

from . import space


@dataclass
class TrialData:
    train: object            # workers.training.inprocess.Split
    val: object
    val_arrays: dict
    tokenizer: object
    tokenizer_uri: str


# the splits, the tokenizer and the preprocessed validation records, once per process (a process
# that runs several trials in turn, when Tune reuses its actor, loads them once)
_CACHE: dict[tuple, TrialData] = {}


def trial_data(cfg: GammarayConfig, store: Store) -> TrialData:
    from pipelines.tokenizer import load as load_tokenizer
    from workers.training.inprocess import Split, load_split, preprocess
    from pipelines.tokenizer import tokenizer_uri

    d = cfg.data
    key = (d.train, d.val, tokenizer_uri(cfg), d.image_size, d.max_text_tokens, cfg.eval.max_records)
    if key not in _CACHE:
        tok_uri = tokenizer_uri(cfg)
        tokenizer = load_tokenizer(tok_uri, store)
        train, val = load_split(d.train, store), load_split(d.val, store)
        if cfg.eval.max_records is not None and val.size > cfg.eval.max_records:
            n = cfg.eval.max_records  # the first records by sample_index, as the loop's validation takes them
            val = Split(columns={k: v[:n] for k, v in val.columns.items()},
                        labels={k: v[:n] for k, v in val.labels.items()})
        arrays = preprocess(val, tokenizer, tok_uri, cfg, seed=0, epoch=0, train=False, with_aug=False)
        _CACHE.clear()
        _CACHE[key] = TrialData(train, val, arrays, tokenizer, tok_uri)
    return _CACHE[key]


def validation_metrics(emb: dict[str, np.ndarray], labels: dict, cfg: GammarayConfig) -> dict[str, float]:
    """What the training loop's validation reports (workers/evaluation/evaluate.py run_evaluation, without the
    zero-shot prompts): R@1/5/10 both ways, the modality gap, and the modality-specific probes."""
    import torch

    from workers.evaluation.metrics import modality_gap, retrieval_metrics, specific_probes

    image, text = torch.from_numpy(emb["image"]), torch.from_numpy(emb["text"])
    m = retrieval_metrics(image, text)
    m["modality_gap"] = modality_gap(image, text)
    m["records"] = int(image.shape[0])
    if cfg.eval.specific_attributes:
        m.update(specific_probes(emb, labels, cfg.eval.specific_attributes, cfg.run.seed, cfg.eval.probe_l2))
    return m


def run_trial(params: dict, base: dict, experiment_uri: str, store: Store) -> None:
    """The Tune trainable: train the trial's config in this process, report every eval_every steps."""
    import torch
    from ray import tune

    from workers.training.inprocess import LocalRun, planned_steps, train
    from workers.training.metrics import prefixed

    from .objectives import with_every_objective

    cpu0 = time.process_time()
    cfg0 = from_dict(base)
    cfg = space.trial_config(cfg0, space.effective(params, cfg0.tune.space))
    torch.set_num_threads(max(1, int(round(cfg.tune.trial_cpus))))
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    data = trial_data(cfg, store)
    total = planned_steps(cfg, data.train.size)
    run = LocalRun(cfg, cfg.run.seed, len(data.tokenizer), data.tokenizer.pad_token_id, data.train.size, total, device)
    every = cfg.train.eval_every or total

    def on_step(step: int) -> None:
        final = step == total
        if step % every and not final:
            return
        metrics = validation_metrics(run.embed(data.val_arrays), data.val.labels, cfg)
        tune.report(with_every_objective(
            {"step": step, "final": final, **prefixed(metrics), **{f"train/{k}": v for k, v in run.last.items()},
             "trial_cpu_s": time.process_time() - cpu0, "process_cpu_s": time.process_time(), "train_s": run.train_s},
            list(cfg.tune.objectives)))

    train(cfg, run, data.train, data.tokenizer, data.tokenizer_uri, cfg.run.seed, on_step)


def trainable(cfg: GammarayConfig, store: Store, experiment_uri: str):
    from ray import tune

    fn = tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), experiment_uri=experiment_uri, store=store)
    resources = {"CPU": cfg.tune.trial_cpus, **({"GPU": 1} if cfg.train.use_gpu else {})}
    return tune.with_resources(fn, resources)
