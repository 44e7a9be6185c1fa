"""`gammaray bench synthetic`: the synthetic study of Chen et al. (NeurIPS 2022), on the library code.

Per seed a finite data set of n pairs: x ~ N(0, 1), y = rho x + sqrt(1 - rho^2) eps. The true log
density ratio is g(x, y) = -0.5 log(1-rho^2) - (y - rho x)^2 / (2 (1-rho^2)) + y^2 / 2 and the model
score is s_theta(x, y) = theta * g(x, y), so the population objective -s(x, y+) + log E_{y-} exp(s(x, y-))
is minimised at exactly theta = 1 (exp(g) p(y) = p(y|x)). On the finite set, with negatives drawn from
it, the full-data objective

    F_n(theta) = mean_i [ -theta g_ii + log mean_{j != i} exp(theta g_ij) ]

has its own optimum theta*_n (about 0.95-0.99 at n = 2000), found here by full-batch Newton steps on the
exact objective (float64, |F'| < 1e-9). Every method then trains theta by SGD over minibatches of the
same set for several epochs, each step calling the library's own score-level code on the batch's
score matrix S = theta * g(x_a, y_b):

    infonce       workers.losses.contrastive.infonce_scores(include_positive=False): minibatch InfoNCE
                  over the in-batch negatives, i.e. the minibatch estimate of F_n's loss term
    gamma         workers.losses.gamma.GammaDirection.scores: EM with a per-sample EMA memory
    sogclr        the same with estimator="sogclr" (SogCLR's moving average, relative to s_i+)
    infonce_clip  (optional) CLIP's InfoNCE, the positive in the denominator too. In this well-specified
                  model it is not biased in theta: the optimum of K-sample InfoNCE is the log density
                  ratio for every K (the positive is a proper member of the K-way classification). The
                  bias studied here, and removed by the memory, is that of estimating the partition
                  function E_neg[exp(s)] from a few in-batch negatives.

All (rho, seed) data sets of a (method, batch size) cell train together: each row of the score matrix
is one anchor against its own block's batch (disjoint sample indices in one memory), which is exactly
the per-seed computation, in one library call per step.
Scores grow fast with rho: the library works in log space throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.losses.contrastive import infonce_scores
from workers.losses.gamma import GammaDirection, GammaSettings, estimate_partition
from workers.losses.state import LocalRateStore

METHODS = ("infonce", "gamma", "sogclr")
ALL_METHODS = METHODS + ("infonce_clip",)


@dataclass
class StudyConfig:
    n: int = 2000
    epochs: int = 30
    lr: float = 0.1
    lr_final: float = 0.002
    theta0: float = 0.0
    gamma: float = 0.1
    seeds: tuple[int, ...] = tuple(range(10))
    rhos: tuple[float, ...] = (0.5, 0.7, 0.9)
    batch_sizes: tuple[int, ...] = (8, 64)
    methods: tuple[str, ...] = METHODS
    extra: dict = field(default_factory=dict)

    def lr_at(self, progress: float) -> float:
        """Constant for the first half, then cosine decay to lr_final (the noise at batch 8 must be
        averaged away for theta to settle; the same schedule for every method)."""
        if progress < 0.5:
            return self.lr
        p = (progress - 0.5) / 0.5
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * p))


def make_pairs(seed: int, n: int, rho: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, int(round(rho * 1000)), n])
    x = rng.standard_normal(n)
    y = rho * x + math.sqrt(1.0 - rho**2) * rng.standard_normal(n)
    return x, y


def log_ratio(x: torch.Tensor, y: torch.Tensor, rho: float) -> torch.Tensor:
    """g(x_a, y_b) for every a, b: [len(x), len(y)] float64."""
    v = 1.0 - rho**2
    return -0.5 * math.log(v) - (y[None, :] - rho * x[:, None]) ** 2 / (2 * v) + y[None, :] ** 2 / 2


def full_data_objective(theta: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """F_n(theta) = mean_i [-theta g_ii + log mean_{j != i} exp(theta g_ij)], through the library's
    partition estimate (negatives only) on the full n x n score matrix."""
    n = G.shape[0]
    est = estimate_partition(theta * G, torch.arange(n), GammaSettings(include_positive=False))
    return (-est.pos + est.log_zhat).mean()


def theta_star(G: torch.Tensor, theta0: float = 1.0, tol: float = 1e-9) -> float:
    """The exact minimiser of the (convex) full-data objective: Newton steps with autograd's first and
    second derivatives, halving a step that does not decrease F."""
    th = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    for _ in range(50):
        f = full_data_objective(th, G)
        (d1,) = torch.autograd.grad(f, th, create_graph=True)
        (d2,) = torch.autograd.grad(d1, th)
        if abs(float(d1.detach())) < tol:
            return float(th.detach())
        step = float(d1.detach()) / max(float(d2), 1e-12)
        with torch.no_grad():
            t = 1.0
            while t > 1e-6:
                cand = th - t * step
                if float(full_data_objective(cand, G)) <= float(f):
                    break
                t *= 0.5
            th.copy_(cand)
    raise RuntimeError(f"theta_star: Newton did not converge (|F'| = {abs(float(d1.detach())):.2e})")


class StackedBlocks:
    """Every (rho, seed) data set of one (method, batch size) cell, trained together.

    Row r of the score matrix is anchor a of block k = r div B, against the B candidates of that
    block's batch: logits [K*B, B], positive at column a. The library treats each row on its own (its
    candidates, its positive column, its sample index, offset by k*n in one memory), so this is exactly
    K independent runs, in one call per step."""

    def __init__(self, blocks: list[tuple[float, int]], xs: list[np.ndarray], ys: list[np.ndarray], batch_size: int,
                 method: str, cfg: StudyConfig):
        self.blocks, self.B, self.method, self.cfg = blocks, batch_size, method, cfg
        self.K = len(blocks)
        self.n = len(xs[0])
        self.X = torch.from_numpy(np.stack(xs))                                   # [K, n]
        self.Y = torch.from_numpy(np.stack(ys))
        self.rho = torch.tensor([r for r, _ in blocks], dtype=torch.float64)[:, None, None]
        self.rngs = [np.random.default_rng([seed, int(round(rho * 1000)), batch_size, 7]) for rho, seed in blocks]
        settings = GammaSettings(alpha=1.0, gamma=cfg.gamma, mode="mean", include_positive=False,
                                 estimator="sogclr" if method == "sogclr" else "gamma")
        memory = method in ("gamma", "sogclr")
        self.direction = GammaDirection(LocalRateStore(self.K * self.n), settings) if memory else None
        self.theta = torch.full((self.K,), cfg.theta0, dtype=torch.float64, requires_grad=True)

    def epoch_batches(self) -> list[torch.Tensor]:
        perms = torch.from_numpy(np.stack([rng.permutation(self.n) for rng in self.rngs]))   # [K, n]
        steps = self.n // self.B                     # the remainder is dropped (drop_last)
        return [perms[:, k * self.B:(k + 1) * self.B] for k in range(steps)]

    def step(self, batch: torch.Tensor, lr: float) -> None:
        K, B = self.K, self.B
        x = torch.gather(self.X, 1, batch)                                      # [K, B]
        y = torch.gather(self.Y, 1, batch)
        v = 1.0 - self.rho**2
        g = -0.5 * torch.log(v) - (y[:, None, :] - self.rho * x[:, :, None]) ** 2 / (2 * v) + y[:, None, :] ** 2 / 2
        logits = (self.theta[:, None, None] * g).reshape(K * B, B)              # [K*B, B]
        pos = torch.arange(B).repeat(K)
        if self.direction is None:
            loss = infonce_scores(logits, pos, include_positive=self.method == "infonce_clip")
        else:
            index = (batch + self.n * torch.arange(K)[:, None]).reshape(-1)
            loss, _ = self.direction.scores(logits, pos, index)
        # the library averages over all K*B anchors: times K gives each block its own batch mean
        (grad,) = torch.autograd.grad(loss * K, self.theta)
        with torch.no_grad():
            self.theta -= lr * grad


def run_cell(blocks, xs, ys, B, method, cfg, progress=None) -> np.ndarray:
    """Train every block of one (method, batch size) cell; theta after each epoch, [epochs + 1, K]."""
    model = StackedBlocks(blocks, xs, ys, B, method, cfg)
    traj = [model.theta.detach().numpy().copy()]
    total = cfg.epochs * (cfg.n // B)
    t = 0
    for _ in range(cfg.epochs):
        for batch in model.epoch_batches():
            model.step(batch, cfg.lr_at(t / total))
            t += 1
            if progress is not None:
                progress.update(1)
        traj.append(model.theta.detach().numpy().copy())
    return np.stack(traj)


def run_study(cfg: StudyConfig, show_progress: bool = True) -> tuple[dict, dict]:
    from tqdm import tqdm

    torch.set_num_threads(1)
    blocks = [(rho, s) for rho in cfg.rhos for s in cfg.seeds]
    xs, ys, stars = [], [], {}
    for rho, s in tqdm(blocks, desc="theta*_n (full-batch Newton)", disable=not show_progress):
        x, y = make_pairs(s, cfg.n, rho)
        xs.append(x)
        ys.append(y)
        stars[(rho, s)] = theta_star(log_ratio(torch.from_numpy(x), torch.from_numpy(y), rho))
    work = sum(cfg.epochs * (cfg.n // B) for B in cfg.batch_sizes) * len(cfg.methods)
    results, trajectories = [], {}
    bar = tqdm(total=work, unit="step", desc="synthetic study", disable=not show_progress, mininterval=1.0)
    for B in cfg.batch_sizes:
        for method in cfg.methods:
            bar.set_postfix_str(f"batch {B} {method}")
            traj = run_cell(blocks, xs, ys, B, method, cfg, bar)
            for k, (rho, s) in enumerate(blocks):
                trajectories.setdefault((method, rho, B), []).append(traj[:, k])
                results.append({"method": method, "rho": rho, "batch_size": B, "seed": s,
                                "theta_final": float(traj[-1, k]), "theta_star": stars[(rho, s)]})
    bar.close()
    trajectories = {key: np.stack(v, axis=1) for key, v in trajectories.items()}
    results.sort(key=lambda r: (r["rho"], r["batch_size"], ALL_METHODS.index(r["method"]), r["seed"]))
    return {"population_theta_star": 1.0, "results": results}, trajectories


def summary_rows(out: dict, tol: float = 0.05) -> list[dict]:
    rows = {}
    for r in out["results"]:
        key = (r["method"], r["rho"], r["batch_size"])
        rows.setdefault(key, []).append(r)
    table = []
    for (method, rho, B), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2], ALL_METHODS.index(kv[0][0]))):
        final = np.array([r["theta_final"] for r in rs])
        star = np.array([r["theta_star"] for r in rs])
        table.append({"rho": rho, "batch_size": B, "method": method, "seeds": len(rs),
                      "theta_final_mean": float(final.mean()), "theta_final_std": float(final.std()),
                      "theta_star_mean": float(star.mean()),
                      "mean_abs_gap": float(np.abs(final - star).mean()),
                      "within_tol": int((np.abs(final - star) <= tol).sum())})
    return table


def format_table(table: list[dict], tol: float = 0.05) -> str:
    head = f"| rho | batch | method | theta_final (mean +- std) | theta*_n (mean) | mean abs gap | within {tol} |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['rho']} | {t['batch_size']} | {t['method']} | {t['theta_final_mean']:.3f} +- "
                     f"{t['theta_final_std']:.3f} | {t['theta_star_mean']:.3f} | {t['mean_abs_gap']:.3f} | "
                     f"{t['within_tol']}/{t['seeds']} |")
    return "\n".join(lines)


def plot(trajectories: dict, out: dict, cfg: StudyConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rhos, methods = list(cfg.rhos), list(cfg.methods)
    fig, axes = plt.subplots(len(rhos), len(methods), figsize=(4.2 * len(methods), 3.0 * len(rhos)),
                             sharex=True, squeeze=False)
    colours = {8: "tab:red", 64: "tab:blue"}
    for i, rho in enumerate(rhos):
        stars = [r["theta_star"] for r in out["results"] if r["rho"] == rho and r["method"] == methods[0]
                 and r["batch_size"] == cfg.batch_sizes[0]]
        for j, method in enumerate(methods):
            ax = axes[i][j]
            for B in cfg.batch_sizes:
                traj = trajectories[(method, rho, B)]
                ep = np.arange(traj.shape[0])
                c = colours.get(B, None)
                ax.plot(ep, traj.mean(1), color=c, label=f"batch {B}: mean")
                ax.fill_between(ep, traj.min(1), traj.max(1), color=c, alpha=0.2, label=f"batch {B}: min-max")
            ax.axhspan(min(stars) - 0.05, max(stars) + 0.05, color="green", alpha=0.12,
                       label="theta*_n +- 0.05 (all seeds)")
            ax.axhline(1.0, color="k", ls="--", lw=0.8, label="population theta* = 1")
            ax.set_ylim(0.6, 1.8)
            ax.set_title(f"{method}, rho = {rho}")
            if i == len(rhos) - 1:
                ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel("theta")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Synthetic study: theta over training, {len(cfg.seeds)} seeds, n = {cfg.n}, SGD "
                 f"{cfg.epochs} epochs (lr {cfg.lr} then cosine to {cfg.lr_final}), gamma EMA {cfg.gamma}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# `gammaray bench synthetic`


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", required=True, help="write the results here (and the plot next to it, .png)")
    p.add_argument("--png", metavar="PATH", help="plot path (default: the JSON path with .png)")
    p.add_argument("--n", type=int, default=2000, help="pairs per seed (default 2000; the issue asks >= 2000)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per cell (default 10)")
    p.add_argument("--epochs", type=int, default=30, help="SGD epochs over each seed's data set (default 30)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of the first half (default 0.1)")
    p.add_argument("--lr-final", type=float, default=0.002, help="learning rate at the end of the cosine decay")
    p.add_argument("--gamma", type=float, default=0.1, help="EMA weight of the per-sample memory (default 0.1)")
    p.add_argument("--rho", type=float, nargs="+", default=[0.5, 0.7, 0.9], help="correlations (default 0.5 0.7 0.9)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[8, 64], help="batch sizes (default 8 64)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL_METHODS,
                   help="default: infonce gamma sogclr; infonce_clip adds CLIP's InfoNCE (positive in the denominator)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise ValueError("--n must be at least 2")
    cfg = StudyConfig(n=args.n, epochs=args.epochs, lr=args.lr, lr_final=args.lr_final, gamma=args.gamma,
                      seeds=tuple(range(args.seeds)), rhos=tuple(args.rho), batch_sizes=tuple(args.batch_size),
                      methods=tuple(args.methods))
    for B in cfg.batch_sizes:
        if not 1 <= B <= cfg.n:
            raise ValueError(f"--batch-size {B} must be between 1 and --n {cfg.n}")
    t0 = time.perf_counter()
    out, traj = run_study(cfg, show_progress=not args.quiet)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    png = args.png or os.path.splitext(args.json)[0] + ".png"
    plot(traj, out, cfg, png)
    print(f"synthetic study: n={cfg.n}, {len(cfg.seeds)} seeds, {cfg.epochs} epochs, SGD lr {cfg.lr} -> "
          f"{cfg.lr_final} (cosine over the second half), theta0={cfg.theta0}, gamma EMA {cfg.gamma}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_table(summary_rows(out)))
    print(f"wrote {args.json} and {png}")
    return 0
