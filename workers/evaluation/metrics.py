"""Metrics on frozen embeddings (docs/design.md section 6), pure functions of tensors and arrays: image->text
and text->image retrieval R@K, zero-shot category accuracy, linear probe and k-shot accuracy for the
category and every attribute column, modality-specific probes, the modality gap, and the helpers of
the eval report (confusion, 2-D projection).

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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


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
