"""The PNG report of `gammaray eval`: recall curves, zero-shot confusion of the top categories, a 2-D
projection of both modalities, probe accuracies against chance."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from workers.evaluation.metrics import ProbeResult, confusion, pca_2d, recall_curve


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


def write_report(res: EvalResult, path: str, title: str = "", top: int = 8, max_points: int = 600,
                 seed: int = 0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res.metrics
    fig, axes = plt.subplots(2, 2, figsize=(13, 10.5))
    fig.suptitle(title or "gammaray eval", fontsize=13)

    # 1. recall curves
    ax = axes[0, 0]
    n = int(m["records"])
    max_k = max(1, min(n, 100))
    ks = np.arange(1, max_k + 1)
    ax.plot(ks, recall_curve(res.ranks_i2t, max_k), label=f"image->text (R@1 {m['r_at_1_i2t']:.3f})")
    ax.plot(ks, recall_curve(res.ranks_t2i, max_k), label=f"text->image (R@1 {m['r_at_1_t2i']:.3f})")
    ax.plot(ks, np.minimum(1.0, ks / max(1, n)), "k:", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"retrieval over {n} held-out records")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")

    # 2. zero-shot confusion of the top categories
    ax = axes[0, 1]
    if res.classes and res.category_labels is not None:
        cm, names = confusion(res.category_labels, res.zero_shot_pred, res.classes, top=top)
        rows = cm / np.maximum(1, cm.sum(axis=1, keepdims=True))
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        short = [_short(c) for c in names]
        ax.set_xticks(range(len(names)), short, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), short, fontsize=8)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xlabel("zero-shot prediction")
        ax.set_ylabel("true category")
        ax.set_title(f"zero-shot accuracy {m.get('zero_shot_acc', float('nan')):.3f} "
                     f"(chance {m.get('zero_shot_chance', float('nan')):.3f})")
    else:
        ax.text(0.5, 0.5, "no categories", ha="center", va="center")
        ax.set_axis_off()

    # 3. joint 2-D projection of both modalities
    ax = axes[1, 0]
    emb = res.embeddings
    if emb:
        rng = np.random.default_rng(seed)
        sel = np.sort(rng.choice(n, size=min(n, max_points), replace=False)) if n else np.zeros(0, int)
        img, txt = emb["image"][sel], emb["text"][sel]
        xy = pca_2d(np.concatenate([img, txt]))
        pi, pt = xy[: len(sel)], xy[len(sel):]
        for j in range(min(len(sel), 40)):
            ax.plot([pi[j, 0], pt[j, 0]], [pi[j, 1], pt[j, 1]], color="0.75", lw=0.5, zorder=0)
        colours = _category_colours(res, sel, top)
        ax.scatter(pi[:, 0], pi[:, 1], c=colours, marker="o", s=14, alpha=0.8)
        ax.scatter(pt[:, 0], pt[:, 1], c=colours, marker="x", s=14, alpha=0.8)
        ax.scatter([], [], c="0.3", marker="o", s=14, label="image (colour = category)")
        ax.scatter([], [], c="0.3", marker="x", s=14, label="text")
        ax.set_title(f"PCA of both modalities (o image, x text; gap {m['modality_gap']:.3f})")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.set_axis_off()

    # 4. probes
    ax = axes[1, 1]
    probes = res.probes
    if probes:
        labels = sorted({p.label for p in probes}, key=lambda s: (s != "category", s))
        embs = sorted({p.embedding for p in probes}, key=lambda s: (s not in ("image", "text"), s))
        width = 0.8 / len(embs)
        x = np.arange(len(labels))
        for e_i, e in enumerate(embs):
            by = {p.label: p for p in probes if p.embedding == e}
            lin = [by[lab].linear if lab in by else np.nan for lab in labels]
            ax.bar(x + (e_i - (len(embs) - 1) / 2) * width, lin, width, label=f"{e}: linear probe")
            kmax = max(by[labels[0]].k_shot) if labels[0] in by and by[labels[0]].k_shot else None
            if kmax is not None:
                ks = [by[lab].k_shot.get(kmax, np.nan) if lab in by else np.nan for lab in labels]
                ax.scatter(x + (e_i - (len(embs) - 1) / 2) * width, ks, marker="D", color="k", s=14,
                           zorder=3, label=f"{kmax}-shot" if e_i == 0 else None)
        chance = [next((p.chance for p in probes if p.label == lab), np.nan) for lab in labels]
        ax.scatter(x, chance, marker="_", color="red", s=600, zorder=4, label="chance (majority)")
        ax.set_xticks(x, [lab.replace("attr:", "") for lab in labels], rotation=30, ha="right", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title("probes on frozen embeddings")
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.set_axis_off()

    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _short(c: str, n: int = 22) -> str:
    c = c.split(">")[-1].strip() if ">" in c else c
    return c if len(c) <= n else c[: n - 1] + "…"


def _category_colours(res: EvalResult, sel: np.ndarray, top: int) -> list:
    import matplotlib

    if res.category_labels is None or not res.classes:
        return ["C0"] * len(sel)
    lab = res.category_labels[sel]
    freq = np.bincount(res.category_labels[res.category_labels >= 0], minlength=len(res.classes))
    keep = list(np.argsort(-freq, kind="stable")[:top])
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(keep.index(v) % 10) if v in keep else (0.6, 0.6, 0.6, 1.0) for v in lab]
