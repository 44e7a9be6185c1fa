"""Evaluation: metrics on frozen embeddings, and the one evaluation of a prepared catalogue that both
the training loop (periodic validation R@1, checkpoint ranking, Ray Tune) and `gammaray eval` run.

Metrics (DESIGN.md section 6): image->text and text->image retrieval R@K, zero-shot category
accuracy (category names through the text tower with a prompt template), linear probe and k-shot
accuracy on frozen embeddings for the category and every attribute column, the modality gap.

Conventions, chosen to never flatter a model:
- a candidate whose score ties the positive's ranks ahead of it, so a collapsed model that gives
  every pair the same score gets R@1 = 0 (not 1, and not 1/N in expectation as random tie-breaking
  would give). Duplicate records (identical embeddings) therefore count against each other: a
  catalogue with duplicates reports them as misses, which is what a deduplicating retrieval system
  would see as well;
- a NaN score is a miss at the worst rank (NaN compares false, which would otherwise look like rank 0);
- a probe test record whose class never occurs in the probe's training part is a miss.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from gammaray.schema import BatchKeys as K, pair_slots

# forward outputs that are not per-record embeddings of the evaluated (un-augmented) views
NOT_EMBEDDINGS = ("logit_scale", "logit_bias")


# --------------------------------------------------------------------------------------------
# retrieval


def retrieval_ranks(query: torch.Tensor, gallery: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """0-based rank of gallery[i] among all gallery items for query[i]: the number of other items
    scoring >= the positive (ties count against). Memory O(chunk * N), not O(N^2)."""
    q, g = query.float(), gallery.float()
    n = q.shape[0]
    if g.shape[0] != n:
        raise ValueError(f"query and gallery must pair up row by row, got {n} and {g.shape[0]} rows")
    ranks = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        sims = q[s:e] @ g.T
        rows = torch.arange(e - s)
        pos = sims[rows, torch.arange(s, e)].unsqueeze(1)
        r = (sims >= pos).sum(dim=1) - 1
        r[torch.isnan(pos.squeeze(1))] = n - 1
        ranks[s:e] = r
    return ranks


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    n = max(1, ranks.numel())
    return {k: float((ranks < k).sum()) / n for k in ks}


def recall_curve(ranks: torch.Tensor, max_k: int) -> np.ndarray:
    """R@K for K = 1..max_k."""
    n = max(1, ranks.numel())
    counts = torch.bincount(ranks.clamp(max=max_k), minlength=max_k + 1)[:max_k]
    return (counts.cumsum(0).double() / n).numpy()


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    i2t = recall_at_k(retrieval_ranks(image, text), ks)
    t2i = recall_at_k(retrieval_ranks(text, image), ks)
    out = {}
    for k in ks:
        out[f"r_at_{k}_i2t"] = i2t[k]
        out[f"r_at_{k}_t2i"] = t2i[k]
    out["chance_r_at_1"] = 1.0 / max(1, image.shape[0])
    return out


# --------------------------------------------------------------------------------------------
# zero-shot classification and the modality gap


def zero_shot_predictions(image: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, hit) per image. A hit needs the own class strictly above every other
    class prompt (ties count against); the prediction is the argmax (lowest index on ties)."""
    sims = image.float() @ class_text.float().T
    own = sims.gather(1, labels.view(-1, 1))
    beaten = (sims >= own).sum(dim=1) - 1
    hit = (beaten == 0) & ~torch.isnan(own.squeeze(1))
    return sims.argmax(dim=1), hit


def zero_shot_accuracy(image: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most similar class prompt is their own class (ties count against)."""
    if not labels.numel():
        return 0.0
    return float(zero_shot_predictions(image, class_text, labels)[1].float().mean())


def modality_gap(image: torch.Tensor, text: torch.Tensor) -> float:
    """Distance between the centroids of the two modalities (Liang et al. 2022)."""
    return float(torch.linalg.vector_norm(image.float().mean(0) - text.float().mean(0)))


def category_prompts(categories: Sequence[str], template: str) -> list[str]:
    """Category paths -> zero-shot prompts ("{}" is replaced by the category path)."""
    return [template.format(c) for c in categories]


def labels_for(values: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# linear probe and k-shot on frozen embeddings


def _probe_loss_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray, C: int, l2: float) -> tuple[float, np.ndarray]:
    D = x.shape[1]
    W, b = theta[: D * C].reshape(D, C), theta[D * C:]
    z = x @ W + b
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    n = x.shape[0]
    loss = float((lse - z[np.arange(n), y]).mean() + l2 * (W * W).sum())
    p = np.exp(z - lse[:, None])
    p[np.arange(n), y] -= 1.0
    p /= n
    return loss, np.concatenate([(x.T @ p + 2 * l2 * W).ravel(), p.sum(axis=0)])


def fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1e-4,
                     max_iter: int = 200, history: int = 10, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS (two-loop recursion,
    Armijo backtracking) in float64 numpy: deterministic, and fast for the small problems of a probe.
    Returns (W [D, C], b [C])."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    D, C = x.shape[1], num_classes
    theta = np.zeros(D * C + C)
    if C < 2:
        return theta[: D * C].reshape(D, C), theta[D * C:]
    f, g = _probe_loss_grad(theta, x, y, C, l2)
    S: list[np.ndarray] = []
    Y: list[np.ndarray] = []
    for _ in range(max_iter):
        if np.abs(g).max() < tol:
            break
        q = g.copy()
        alphas = []
        for s_, y_ in zip(reversed(S), reversed(Y)):
            a = (s_ @ q) / (y_ @ s_)
            alphas.append(a)
            q -= a * y_
        if S:
            q *= (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
        for (s_, y_), a in zip(zip(S, Y), reversed(alphas)):
            q += (a - (y_ @ q) / (y_ @ s_)) * s_
        d = -q
        slope = g @ d
        if slope >= 0:  # not a descent direction: restart from the gradient
            S, Y, d, slope = [], [], -g, -(g @ g)
        step = 1.0
        while True:
            f_new, g_new = _probe_loss_grad(theta + step * d, x, y, C, l2)
            if f_new <= f + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s_k, y_k = step * d, g_new - g
        theta, f, g = theta + s_k, f_new, g_new
        if y_k @ s_k > 1e-12:
            S.append(s_k)
            Y.append(y_k)
            if len(S) > history:
                S.pop(0)
                Y.pop(0)
        if step < 1e-10:
            break
    return theta[: D * C].reshape(D, C), theta[D * C:]


def probe_accuracy(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, y_test: Sequence[str],
                   l2: float = 1e-4) -> float:
    """Accuracy on the test part of a probe fitted on the training part. Labels are strings; a test
    label absent from the training part is a miss."""
    if len(y_test) == 0:
        return float("nan")
    classes = sorted(set(y_train))
    if not classes:
        return 0.0
    index = {c: i for i, c in enumerate(classes)}
    W, b = fit_linear_probe(x_train, np.asarray([index[v] for v in y_train]), len(classes), l2=l2)
    pred = (np.asarray(x_test, dtype=np.float64) @ W + b).argmax(axis=1)
    truth = np.asarray([index.get(v, -1) for v in y_test])
    return float((pred == truth).mean())


def k_shot_indices(y: Sequence[str], k: int, rng: np.random.Generator) -> np.ndarray:
    """k examples of every class (all of a class that has fewer), in a seeded draw."""
    by_class: dict[str, list[int]] = {}
    for i, v in enumerate(y):
        by_class.setdefault(v, []).append(i)
    out = []
    for c in sorted(by_class):
        idx = np.asarray(by_class[c])
        out.extend(rng.choice(idx, size=min(k, idx.size), replace=False).tolist())
    return np.asarray(sorted(out), dtype=np.int64)


def k_shot_accuracy(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, y_test: Sequence[str],
                    k: int, trials: int = 5, seed: int = 0, l2: float = 1e-4) -> float:
    """Mean over `trials` seeded draws of a probe fitted on k examples per class."""
    rng = np.random.default_rng([seed, k])
    y_train = list(y_train)
    accs = []
    for _ in range(max(1, trials)):
        sel = k_shot_indices(y_train, k, rng)
        accs.append(probe_accuracy(x_train[sel], [y_train[i] for i in sel], x_test, y_test, l2=l2))
    return float(np.mean(accs))


def majority_baseline(y_train: Sequence[str], y_test: Sequence[str]) -> float:
    """Accuracy of always answering the most common training class (the probe's chance level)."""
    if not len(y_test) or not len(y_train):
        return float("nan")
    values, counts = np.unique(np.asarray(y_train, dtype=object).astype(str), return_counts=True)
    top = values[np.argmax(counts)]
    return float(np.mean([v == top for v in y_test]))


def stratified_split(y: Sequence[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: a seeded floor(n * test_fraction) records to test, the rest to train (so a class
    seen once lands in train)."""
    rng = np.random.default_rng([seed, 17])
    by_class: dict[str, list[int]] = {}
    for i, v in enumerate(y):
        by_class.setdefault(v, []).append(i)
    train, test = [], []
    for c in sorted(by_class):
        idx = np.asarray(by_class[c])
        rng.shuffle(idx)
        n_test = int(np.floor(idx.size * test_fraction))
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return np.asarray(sorted(train), dtype=np.int64), np.asarray(sorted(test), dtype=np.int64)


@dataclass
class ProbeResult:
    embedding: str        # which embedding was probed: image, text, or an extra model output
    label: str            # category, or attr:<key>
    classes: int
    n_train: int
    n_test: int
    linear: float
    k_shot: dict[int, float]
    chance: float

    def flat(self) -> dict[str, float]:
        key = f"probe_{self.embedding}_{_slug(self.label)}"
        out = {f"{key}_linear": self.linear, f"{key}_chance": self.chance}
        out.update({f"{key}_k{k}": v for k, v in self.k_shot.items()})
        return out


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def run_probes(train_emb: dict[str, np.ndarray], train_labels: dict[str, list[str | None]],
               test_emb: dict[str, np.ndarray], test_labels: dict[str, list[str | None]],
               k_shots: Sequence[int], trials: int, seed: int, l2: float) -> list[ProbeResult]:
    """A probe per (embedding, label column), each on the records that carry the label."""
    out = []
    for label in sorted(set(train_labels) & set(test_labels)):
        ytr_all, yte_all = train_labels[label], test_labels[label]
        tr = np.asarray([i for i, v in enumerate(ytr_all) if v is not None], dtype=np.int64)
        te = np.asarray([i for i, v in enumerate(yte_all) if v is not None], dtype=np.int64)
        if tr.size == 0 or te.size == 0:
            continue
        ytr = [ytr_all[i] for i in tr]
        yte = [yte_all[i] for i in te]
        for name in sorted(set(train_emb) & set(test_emb)):
            xtr, xte = train_emb[name][tr], test_emb[name][te]
            out.append(ProbeResult(
                embedding=name, label=label, classes=len(set(ytr)), n_train=int(tr.size), n_test=int(te.size),
                linear=probe_accuracy(xtr, ytr, xte, yte, l2=l2),
                k_shot={k: k_shot_accuracy(xtr, ytr, xte, yte, k, trials=trials, seed=seed, l2=l2) for k in k_shots},
                chance=majority_baseline(ytr, yte)))
    return out


# --------------------------------------------------------------------------------------------
# modality-specific information: attributes only one modality carries, probed from its embedding


def standardized_probe_accuracy(x_fit: np.ndarray, y_fit: Sequence[str], x_test: np.ndarray, y_test: Sequence[str],
                                l2: float = 1e-4) -> float:
    """probe_accuracy on features standardised with the fitting part's mean and deviation (unit-norm
    embeddings spread over many small coordinates; L-BFGS converges on standardised ones)."""
    x_fit = np.asarray(x_fit, dtype=np.float64)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    return probe_accuracy((x_fit - mu) / sd, y_fit, (np.asarray(x_test, dtype=np.float64) - mu) / sd, y_test, l2=l2)


def specific_probes(emb: dict[str, np.ndarray], cols: dict[str, list[str | None]],
                    attributes: dict[str, list[str]], seed: int, l2: float = 1e-4,
                    fit: tuple[dict[str, np.ndarray], dict[str, list[str | None]]] | None = None) -> dict[str, float]:
    """How much of what only one modality knows its embedding keeps: for each attribute in
    `attributes[side]` (side = image or text), the accuracy of a linear probe on `emb[side]`.

    Probes are fitted on `fit` (embeddings and label columns of another split) when given, else
    two-fold on the evaluated records themselves (stratified halves by the attribute; each half is
    tested with the probe fitted on the other, so every record is tested once). Records without the
    attribute are left out. Returns probe_<side>_only_<attr>, probe_<side>_only (the side's mean) and
    probe_specific (the mean over the sides): the modality-specific objective of Ray Tune."""
    out: dict[str, float] = {}
    side_means = []
    for side in ("image", "text"):
        accs = []
        for attr in attributes.get(side, []):
            col = f"attr:{attr}"
            if col not in cols or (fit is not None and col not in fit[1]):
                where = cols if col not in cols else fit[1]
                known = sorted(c[5:] for c in where if c.startswith("attr:"))
                raise ValueError(f"eval.specific_attributes.{side}: no record carries the attribute {attr!r} "
                                 f"(attributes present: {', '.join(known) or 'none'})")
            if fit is not None:
                fit_emb, fit_cols = fit
                tr = [i for i, v in enumerate(fit_cols[col]) if v is not None]
                te = [i for i, v in enumerate(cols[col]) if v is not None]
                acc = standardized_probe_accuracy(fit_emb[side][tr], [fit_cols[col][i] for i in tr], emb[side][te],
                                                  [cols[col][i] for i in te], l2)
            else:
                keep = np.asarray([i for i, v in enumerate(cols[col]) if v is not None], dtype=np.int64)
                y = [cols[col][i] for i in keep]
                x = emb[side][keep]
                hits, tested = 0.0, 0
                for fit_idx, test_idx in itertools.permutations(stratified_split(y, 0.5, seed)):
                    if len(fit_idx) and len(test_idx):  # (too few records: a half may be empty)
                        hits += len(test_idx) * standardized_probe_accuracy(
                            x[fit_idx], [y[i] for i in fit_idx], x[test_idx], [y[i] for i in test_idx], l2)
                        tested += len(test_idx)
                if not tested:
                    continue
                acc = hits / tested
            out[f"probe_{side}_only_{_slug(attr)}"] = acc
            accs.append(acc)
        if accs:
            out[f"probe_{side}_only"] = float(np.mean(accs))
            side_means.append(out[f"probe_{side}_only"])
    if side_means:
        out["probe_specific"] = float(np.mean(side_means))
    return out


# --------------------------------------------------------------------------------------------
# report helpers


def confusion(truth: np.ndarray, pred: np.ndarray, classes: Sequence[str], top: int = 10) -> tuple[np.ndarray, list[str]]:
    """Counts [true, predicted] over the `top` most frequent true classes plus an "other" bucket."""
    freq = np.bincount(truth[truth >= 0], minlength=len(classes))
    keep = [int(i) for i in np.argsort(-freq, kind="stable")[:top] if freq[i] > 0]
    pos = {c: j for j, c in enumerate(keep)}
    names = [classes[i] for i in keep]
    other = len(keep) < len(classes)
    m = np.zeros((len(keep) + other, len(keep) + other), dtype=np.int64)
    for t, p in zip(truth, pred):
        if t < 0:
            continue
        m[pos.get(int(t), len(keep)), pos.get(int(p), len(keep))] += 1
    return m, names + (["other"] if other else [])


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project onto the first two principal axes (deterministic sign: largest loading positive)."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(axes.shape[0]), np.abs(axes).argmax(axis=1)])
    return xc @ (axes * signs[:, None]).T


# --------------------------------------------------------------------------------------------
# embedding a prepared catalogue with the model being trained or evaluated


def embedding_outputs(out: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """The per-record embeddings among a model's forward outputs: `image`, `text`, and any extra
    [B, D] output a model adds (e.g. modality-specific features); augmented views are skipped."""
    return {k: v for k, v in out.items()
            if k not in NOT_EMBEDDINGS and not k.endswith("_aug") and torch.is_tensor(v) and v.dim() == 2
            and v.shape[0] == batch_size}


def read_labels(catalogue_uri: str, cfg) -> dict[int, dict]:
    """sample_index -> {"category": str | None, "attributes": {key: value}} of a prepared catalogue."""
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.prepare import load_manifest

    manifest = load_manifest(catalogue_uri, cfg.storage)
    out: dict[int, dict] = {}
    for shard in manifest["shards"]:
        fs, path = storage.resolve(storage.join(catalogue_uri, shard["path"]), cfg.storage)
        t = pq.read_table(path, filesystem=fs, columns=["sample_index", "category", "attributes"])
        for idx, cat, attrs in zip(t.column("sample_index").to_pylist(), t.column("category").to_pylist(),
                                   t.column("attributes").to_pylist()):
            out[idx] = {"category": cat, "attributes": dict(attrs) if attrs else {}}
    return out


def advance_to_prefix(seq, n: int):
    """The first n records of a sequence of segments."""
    from pipelines.stream import Segment

    out, left = [], n
    for s in seq:
        if left <= 0:
            break
        take = min(left, s.size)
        out.append(Segment(s.unit, s.start, s.start + take))
        left -= take
    return out


@torch.no_grad()
def embed_split(engine, cfg, catalogue_uri: str, device: torch.device,
                max_records: int | None = None) -> dict[str, np.ndarray]:
    """Embed a prepared catalogue, each rank its part; every rank gets all rows, sorted by index.

    `engine` is a DeepSpeed engine inside the training loop or a plain model (`gammaray eval`); the
    keys are `sample_index` plus every embedding output of the model (`image`, `text`, extras)."""
    import torch.distributed as dist

    from pipelines.prepare import load_manifest
    from pipelines.stream import Segment, iterate, reshard, units_from_manifest

    from workers.runtime import sync_buffers
    from workers.runtime import lockstep, world, placeholder_batch, stream_spec, to_torch

    rank, W = world()
    manifest = load_manifest(catalogue_uri, cfg.storage)
    units = units_from_manifest(manifest)
    seq = [Segment(u, 0, units[u].num_rows) for u in range(len(units))]
    if max_records is not None:
        seq = advance_to_prefix(seq, max_records)
    parts = reshard([seq], W)
    spec = stream_spec(cfg, catalogue_uri, units, epoch=0, train=False, with_aug=False,
                       batch_size=cfg.eval.batch_size)
    sync_buffers(engine)
    was_training = engine.training
    engine.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    idxs = []
    for sb, _, _ in lockstep(iterate(spec, parts[rank]), device):
        if sb is None or sb.size == 0:
            engine(placeholder_batch(cfg, False, device))  # same collectives on every rank
            continue
        out = embedding_outputs(engine(to_torch(sb.arrays, device)), sb.size)
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.float().cpu().numpy())
        idxs.append(sb.arrays[K.SAMPLE_INDEX])
    if was_training:
        engine.train()
    D = cfg.model.embed_dim
    local = {k: np.concatenate(v) for k, v in chunks.items()}
    for k in ("image", "text"):
        local.setdefault(k, np.zeros((0, D), np.float32))
    local["sample_index"] = np.concatenate(idxs) if idxs else np.zeros((0,), np.int64)
    if W > 1:
        gathered: list[Any] = [None] * W
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    keys = sorted(set().union(*[g.keys() for g in gathered]))
    merged = {k: np.concatenate([g[k] for g in gathered if k in g]) for k in keys}
    order = np.argsort(merged["sample_index"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


@torch.no_grad()
def encode_prompts(engine, tokenizer, prompts: list[str], cfg, device: torch.device) -> torch.Tensor:
    enc = tokenizer(prompts, max_length=cfg.data.max_text_tokens, truncation=True, padding="max_length",
                    return_tensors="pt")
    was_training = engine.training
    engine.eval()
    out = engine({K.INPUT_IDS: enc["input_ids"].to(device), K.ATTENTION_MASK: enc["attention_mask"].to(device)})
    if was_training:
        engine.train()
    return out["text"].float().cpu()


# --------------------------------------------------------------------------------------------
# the evaluation


@dataclass
class EvalResult:
    metrics: dict[str, float]
    probes: list[ProbeResult] = field(default_factory=list)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)   # incl. sample_index
    ranks_i2t: torch.Tensor | None = None
    ranks_t2i: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    category_labels: np.ndarray | None = None                         # index into classes, -1 = none
    zero_shot_pred: np.ndarray | None = None

    def to_json(self) -> dict:
        return {"metrics": self.metrics,
                "probes": [{"embedding": p.embedding, "label": p.label, "classes": p.classes,
                            "n_train": p.n_train, "n_test": p.n_test, "linear": p.linear,
                            **{f"k{k}": v for k, v in p.k_shot.items()}, "chance": p.chance}
                           for p in self.probes]}


def label_columns(labels_by_index: dict[int, dict], sample_index: np.ndarray) -> dict[str, list[str | None]]:
    """category and attr:<key> columns aligned with sample_index (None where a record lacks one)."""
    rows = [labels_by_index.get(int(i), {"category": None, "attributes": {}}) for i in sample_index]
    cols: dict[str, list[str | None]] = {"category": [r["category"] for r in rows]}
    keys = sorted({k for r in rows for k in r["attributes"]})
    for k in keys:
        cols[f"attr:{k}"] = [r["attributes"].get(k) for r in rows]
    return cols


@torch.no_grad()
def run_evaluation(engine, cfg, tokenizer, device: torch.device, data_uri: str | None = None,
                   full: bool = False) -> EvalResult:
    """Evaluate a model on a prepared catalogue (default: data.val).

    Always: retrieval R@1/5/10 both ways, zero-shot category accuracy, modality gap. `full` adds
    the linear and k-shot probes (category and every attribute column, on every embedding output)
    and keeps what the PNG report draws."""
    uri = data_uri or cfg.data.val
    if not uri:
        raise ValueError("nothing to evaluate: set data.val (or pass a catalogue URI)")
    emb = embed_split(engine, cfg, uri, device, cfg.eval.max_records)
    # retrieval runs between the two sides of the trained pair (data.view_pair): image<->text by default
    side_a, side_b = pair_slots(cfg.data.view_pair)
    image, text = torch.from_numpy(emb[side_a]), torch.from_numpy(emb[side_b])
    ranks_i2t, ranks_t2i = retrieval_ranks(image, text), retrieval_ranks(text, image)
    metrics: dict[str, float] = {}
    for k in (1, 5, 10):
        metrics[f"r_at_{k}_i2t"] = recall_at_k(ranks_i2t, (k,))[k]
        metrics[f"r_at_{k}_t2i"] = recall_at_k(ranks_t2i, (k,))[k]
    metrics["chance_r_at_1"] = 1.0 / max(1, image.shape[0])
    metrics["modality_gap"] = modality_gap(image, text)
    metrics["val_records"] = int(image.shape[0])
    res = EvalResult(metrics=metrics, ranks_i2t=ranks_i2t, ranks_t2i=ranks_t2i)

    labels_by_index = read_labels(uri, cfg)
    cols = label_columns(labels_by_index, emb["sample_index"])
    if cfg.eval.specific_attributes and cfg.data.view_pair == "image_text":
        metrics.update(specific_probes(emb, cols, cfg.eval.specific_attributes, cfg.run.seed, cfg.eval.probe_l2))
    classes = sorted({c for c in cols["category"] if c})
    if classes and cfg.data.view_pair == "image_text":  # zero-shot = images against category prompts
        class_text = encode_prompts(engine, tokenizer, category_prompts(classes, cfg.eval.prompt_template), cfg, device)
        labels = labels_for(cols["category"], classes)
        keep = labels >= 0
        pred, hit = zero_shot_predictions(image[keep], class_text, torch.from_numpy(labels[keep]))
        metrics["zero_shot_acc"] = float(hit.float().mean()) if keep.any() else 0.0
        metrics["zero_shot_chance"] = 1.0 / len(classes)
        res.classes, res.category_labels = classes, labels
        res.zero_shot_pred = np.full(labels.shape, -1, dtype=np.int64)
        res.zero_shot_pred[keep] = pred.numpy()
    if not full:
        return res

    res.embeddings = emb
    names = [k for k in emb if k != "sample_index"]
    ev = cfg.eval
    if ev.probe_train:
        tr_emb = embed_split(engine, cfg, ev.probe_train, device, ev.probe_max_records)
        tr_cols = label_columns(read_labels(ev.probe_train, cfg), tr_emb["sample_index"])
        train_emb = {k: tr_emb[k] for k in names if k in tr_emb}
        test_emb = {k: emb[k] for k in names}
        train_cols, test_cols = tr_cols, cols
    else:
        # fit on a stratified part of the evaluated records (by category), test on the rest
        strat = [c if c is not None else "" for c in cols["category"]]
        tr, te = stratified_split(strat, ev.probe_test_fraction, cfg.run.seed)
        train_emb = {k: emb[k][tr] for k in names}
        test_emb = {k: emb[k][te] for k in names}
        train_cols = {c: [v[i] for i in tr] for c, v in cols.items()}
        test_cols = {c: [v[i] for i in te] for c, v in cols.items()}
    res.probes = run_probes(train_emb, train_cols, test_emb, test_cols, ev.k_shots, ev.k_shot_trials,
                            cfg.run.seed, ev.probe_l2)
    for p in res.probes:
        metrics.update(p.flat())
    return res


@torch.no_grad()
def evaluate(engine, cfg, tokenizer, device: torch.device) -> dict[str, float]:
    """Validation inside the training loop (every rank calls it; ranks share the embedding work):
    the same code as `gammaray eval`, without the probes."""
    return run_evaluation(engine, cfg, tokenizer, device).metrics


# --------------------------------------------------------------------------------------------
# `gammaray eval`: a checkpoint on a catalogue


def evaluate_checkpoint(checkpoint_uri: str, data_uri: str, overrides: list[str] | None = None,
                        device: str | None = None, report_path: str | None = None, storage_cfg=None) -> dict:
    """Load a checkpoint, evaluate it on a prepared catalogue with every metric, write the PNG
    report; returns the JSON summary (metrics, probe table, where things came from)."""
    import time

    from gammaray.config import apply_overrides
    from pipelines import storage
    from pipelines.tokenizer import load as load_tokenizer

    from workers.evaluation.export import load_checkpoint_model, open_checkpoint, storage_from_overrides
    from workers.runtime import ensure_ray

    t0 = time.perf_counter()
    ckpt = open_checkpoint(checkpoint_uri, storage_cfg or storage_from_overrides(overrides))
    cfg = ckpt.cfg
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg = apply_overrides(cfg, {"data.val": data_uri})
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ensure_ray(cfg)
    model = load_checkpoint_model(ckpt, dev)
    ckpt.close()  # the model is in memory: its temporary local copy can go
    tokenizer = load_tokenizer(cfg.data.tokenizer, storage.S3Settings.from_config(cfg.storage))
    res = run_evaluation(model, cfg, tokenizer, dev, data_uri, full=True)
    summary = {"checkpoint": checkpoint_uri, "model": ckpt.model_uri, "data": data_uri, "device": str(dev),
               **res.to_json()}
    if report_path:
        from workers.evaluation.eval_report import write_report

        m = res.metrics
        title = (f"{ckpt.model_uri.rstrip('/').rsplit('/', 2)[-2] if '/' in ckpt.model_uri else ckpt.model_uri} on "
                 f"{data_uri.rstrip('/').rsplit('/', 1)[-1]}: R@1 i2t {m['r_at_1_i2t']:.3f}, t2i {m['r_at_1_t2i']:.3f}")
        summary["report"] = write_report(res, report_path, title=title, seed=cfg.run.seed)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary
