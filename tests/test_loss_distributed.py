"""The sharded per-sample state and the gathered objectives on real torch.distributed gloo process
groups (torch.multiprocessing spawn, file-store rendezvous, no mocks).

One 2-process group checks: the sharded store equals the single-process store step by step
(duplicates within and across ranks, "no observation" entries, a catalogue that grows, a rank with an
empty batch); the gamma loss (gamma and SogCLR estimators) and InfoNCE with all-gathered negatives give
the single-process loss and gradients of the concatenated batch, with unequal batch sizes; an exact
save/restore at the same world size (sample mode: the generator too); and the memory of a 10^8-entry
state measured on real allocations. A 3-process group then loads the 2-process checkpoint
(re-sharding), checks that nothing was lost, continues in step with the single-process reference and
saves again; the test process loads those 3 shards into one process and compares once more.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import file_rendezvous
from workers.losses.contrastive import infonce_loss
from workers.losses.gamma import GammaContrastiveLoss, GammaSettings
from workers.losses.state import LocalRateStore, ShardedRateStore

pytestmark = pytest.mark.loss

D, N0, GROW = 8, 40, 15
SIZES = [9, 8, 1, 7, 10, 6, 9, 8]     # global batch per step; step 2 leaves a rank empty
STEPS_BEFORE_SAVE = 5


def _init(rank: int, world: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))


def schedule() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Deterministic global batches: (sample_index, image, text, log_z observations for the store)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t, B in enumerate(SIZES):
        hi = N0 if t < STEPS_BEFORE_SAVE - 1 else N0 + GROW          # the catalogue grows at step 4
        idx = torch.randint(0, hi, (B,), generator=g)
        if B > 4:
            idx[3] = idx[0]                                           # a duplicate within the batch
        image = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
        text = F.normalize(image + 0.7 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
        log_z = torch.randn(B, 2, generator=g, dtype=torch.float64) * 20
        log_z[torch.rand(B, 2, generator=g) < 0.15] = math.nan        # no observation
        out.append((idx, image, text, log_z))
    return out


def split(B: int, world: int, t: int) -> list[int]:
    """Uneven per-rank batch sizes (the last step of an epoch, a rank that ran out first)."""
    sizes = [B // world + (1 if r < B % world else 0) for r in range(world)]
    if t % 3 == 1 and sizes[-1] > 0:
        sizes[0] += 1
        sizes[-1] -= 1
    return sizes


def _slice(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values; a memory table may be shorter than the reference's where it never received an
    index of the grown catalogue (the missing tail is "never visited", NaN)."""
    if a.dim() == 1 and a.shape != b.shape:
        n = max(a.numel(), b.numel())
        a, b = (torch.cat([x, x.new_full((n - x.numel(),), math.nan)]) for x in (a, b))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)


def _gamma_settings(estimator: str, mode: str = "mean") -> GammaSettings:
    return GammaSettings(alpha=1.3 if estimator == "gamma" else 1.0, gamma=0.3, mode=mode, estimator=estimator,
                         eps=0.01 if estimator == "sogclr" else 0.0, gather_negatives=True)


def _check_gathered_objective(rank, world, t, sizes, ref_fn, dist_fn, idx, image, text):
    """dist_fn on this rank's slice, weighted by its share, equals ref_fn on the whole batch: the
    loss summed over ranks and each rank's gradient for its rows."""
    im = _slice(image, sizes, rank).clone().requires_grad_()
    tx = _slice(text, sizes, rank).clone().requires_grad_()
    w = sizes[rank] / sum(sizes)
    loss = dist_fn(im, tx, _slice(idx, sizes, rank)) * w
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    ri, rt = image.clone().requires_grad_(), text.clone().requires_grad_()
    ref = ref_fn(ri, rt, idx)
    ref.backward()
    assert abs(float(total) - float(ref.detach())) < 1e-9, (t, float(total), float(ref.detach()))
    torch.testing.assert_close(im.grad, _slice(ri.grad, sizes, rank), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(tx.grad, _slice(rt.grad, sizes, rank), rtol=1e-8, atol=1e-10)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def _memory_check(rank: int, world: int, out_dir: str) -> None:
    """A state of 10^8 samples x 2 directions: each worker allocates N*8/W bytes (measured as the
    growth of its resident memory), and a step adds O(batch) (the peak, VmHWM, after a reset)."""
    import gc

    N = 10**8
    gc.collect()
    before = _rss()
    store = ShardedRateStore(N, channels=2)
    allocated = _rss() - before
    held = store.nbytes()
    assert held == ShardedRateStore.bytes_per_worker(N, world) <= N * 8 / world + 8
    assert 0.97 * held <= allocated <= held + 8 * 2**20, (allocated, held)
    can_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # reset the peak (VmHWM) to the current RSS
    except OSError:
        can_reset = False
    base = _rss()
    g = torch.Generator().manual_seed(rank)
    for _ in range(10):
        store.update(torch.randint(0, N, (512,), generator=g), torch.randn(512, 2, generator=g), 0.1)
    peak_extra = (_hwm() - base) if can_reset else 0
    assert peak_extra < 16 * 2**20, peak_extra
    assert (~torch.isnan(store.tables[0])).sum() > 0
    sd = store.state_dict(0)
    assert sd["log_rate"].data_ptr() == store.tables[0].data_ptr()          # checkpointing copies nothing
    with open(os.path.join(out_dir, f"mem-{rank}.txt"), "w") as f:
        f.write(f"{held} {allocated} {peak_extra} {int(can_reset)}\n")
    del store, sd
    gc.collect()


def _two_workers(rank: int, init_method: str, out_dir: str) -> None:
    world = 2
    _init(rank, world, init_method)
    steps = schedule()

    # 1. the store: sharded == single-process, step by step (ages and a moving memory scale included);
    # the fixed-size exchange (capacity: the training step's path, no host read) and the single-process
    # fixed-size update give the same
    ref = LocalRateStore(N0, channels=2, track_age=True)
    sharded = ShardedRateStore(N0, channels=2, track_age=True)
    fixed = ShardedRateStore(N0 + GROW, channels=2, track_age=True)
    local_fixed = LocalRateStore(N0 + GROW, channels=2, track_age=True)
    for t, (idx, _, _, log_z) in enumerate(steps):
        sizes = split(idx.numel(), world, t)
        gam, scale = (1.0 if t == 0 else 0.1 + 0.1 * t), 1.0 + 0.5 * t
        want = ref.update(idx, log_z, gam, scale)
        got = sharded.update(_slice(idx, sizes, rank), _slice(log_z, sizes, rank), gam, scale)
        _same(got, _slice(want, sizes, rank))
        _same(sharded.last_age, _slice(ref.last_age, sizes, rank))
        got = fixed.update(_slice(idx, sizes, rank), _slice(log_z, sizes, rank), gam, torch.tensor(scale), capacity=8)
        _same(got, _slice(want, sizes, rank))
        _same(fixed.last_age, _slice(ref.last_age, sizes, rank))
        _same(local_fixed.update(idx, log_z, gam, scale, capacity=16), want)
        _same(local_fixed.last_age, ref.last_age)
        for c in range(2):
            _same(sharded.tables[c], ref.tables[c][rank::world])
            _same(fixed.tables[c], ref.tables[c][rank::world])
            _same(local_fixed.tables[c], ref.tables[c])

    # 2. gathered objectives == single-process objectives on the concatenated batch
    for est in ("gamma", "sogclr"):
        s_ref = GammaSettings(**{**_gamma_settings(est).__dict__, "gather_negatives": False})
        ref_loss = GammaContrastiveLoss(N0 + GROW, s_ref, distributed=False)
        dist_loss = GammaContrastiveLoss(N0 + GROW, _gamma_settings(est), distributed=True)
        ref_fixed = GammaContrastiveLoss(N0 + GROW, s_ref, distributed=False)
        dist_fixed = GammaContrastiveLoss(N0 + GROW, _gamma_settings(est), distributed=True, capacity=8)
        scale = torch.tensor([6.0], dtype=torch.float64)
        for t, (idx, image, text, _) in enumerate(steps):
            sizes = split(idx.numel(), world, t)
            for r_loss, d_loss in ((ref_loss, dist_loss), (ref_fixed, dist_fixed)):
                _check_gathered_objective(
                    rank, world, t, sizes,
                    lambda i, x, j: r_loss(i, x, scale, j, progress=t / 8)[0],
                    lambda i, x, j: d_loss(i, x, scale, j, progress=t / 8)[0], idx, image, text)
                for c in range(2):
                    _same(d_loss.store.tables[c], r_loss.store.tables[c][rank::world])
    for t, (idx, image, text, _) in enumerate(steps):
        sizes = split(idx.numel(), world, t)
        scale = torch.tensor([9.0], dtype=torch.float64)
        _check_gathered_objective(rank, world, t, sizes, lambda i, x, j: infonce_loss(i, x, scale),
                                  lambda i, x, j: infonce_loss(i, x, scale, gather=True), idx, image, text)
        _check_gathered_objective(rank, world, t, sizes, lambda i, x, j: infonce_loss(i, x, scale),
                                  lambda i, x, j: infonce_loss(i, x, scale, gather=True, pad_to=8), idx, image, text)

    # 3. save / restore at the same world size, sample mode: exact, generator included
    s = _gamma_settings("gamma", mode="sample")
    run = GammaContrastiveLoss(N0, s, seed=7, distributed=True)
    scale = torch.tensor([6.0], dtype=torch.float64)

    def step(loss, t):
        idx, image, text, _ = steps[t]
        sizes = split(idx.numel(), world, t)
        im = _slice(image, sizes, rank).clone().requires_grad_()
        out, _ = loss(im, _slice(text, sizes, rank), scale, _slice(idx, sizes, rank))
        (g,) = torch.autograd.grad(out * sizes[rank] / idx.numel(), im)
        return out.detach(), g

    for t in range(STEPS_BEFORE_SAVE):
        step(run, t)
    torch.save(run.state_dict(), os.path.join(out_dir, f"loss-w2-rank{rank}.pt"))
    dist.barrier()
    restored = GammaContrastiveLoss(5, s, seed=1234, distributed=True)
    restored.load_shards(torch.load(os.path.join(out_dir, f"loss-w2-rank{r}.pt"), weights_only=False)
                         for r in range(world))
    assert torch.equal(restored.generator.get_state(), run.generator.get_state())
    for t in range(STEPS_BEFORE_SAVE, len(steps)):
        a, b = step(run, t), step(restored, t)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for c in range(2):
        _same(restored.store.tables[c], run.store.tables[c])

    # 4. memory of a 10^8-entry state
    _memory_check(rank, world, out_dir)
    dist.barrier()
    dist.destroy_process_group()


def _reference_after(n_steps: int) -> GammaContrastiveLoss:
    """The single-process state after the first n_steps of the schedule (gathered negatives ==
    the whole batch; the memory does not depend on the E-step mode)."""
    s = GammaSettings(**{**_gamma_settings("gamma").__dict__, "gather_negatives": False})
    ref = GammaContrastiveLoss(N0, s, distributed=False)
    scale = torch.tensor([6.0], dtype=torch.float64)
    for idx, image, text, _ in schedule()[:n_steps]:
        ref(image, text, scale, idx)
    return ref


def _three_workers(rank: int, init_method: str, out_dir: str) -> None:
    world = 3
    _init(rank, world, init_method)
    ref = _reference_after(STEPS_BEFORE_SAVE)
    loss = GammaContrastiveLoss(N0, _gamma_settings("gamma", mode="sample"), seed=7, distributed=True)
    loss.load_shards(torch.load(os.path.join(out_dir, f"loss-w2-rank{r}.pt"), weights_only=False) for r in range(2))
    # nothing lost: this rank holds exactly the reference entries it owns, and the ranks together all
    for c in range(2):
        _same(loss.store.tables[c], ref.store.tables[c][rank::world])
    counts = torch.tensor([int((~torch.isnan(t)).sum()) for t in loss.store.tables])
    dist.all_reduce(counts)
    assert counts.tolist() == [int((~torch.isnan(t)).sum()) for t in ref.store.tables]
    assert counts[0] > 0
    # the restored 3-worker run continues in step with the single-process reference
    scale = torch.tensor([6.0], dtype=torch.float64)
    for t, (idx, image, text, _) in enumerate(schedule()[STEPS_BEFORE_SAVE:], start=STEPS_BEFORE_SAVE):
        sizes = split(idx.numel(), world, t)
        loss(_slice(image, sizes, rank), _slice(text, sizes, rank), scale, _slice(idx, sizes, rank))
        ref(image, text, scale, idx)
        for c in range(2):
            _same(loss.store.tables[c], ref.store.tables[c][rank::world])
    torch.save(loss.state_dict(), os.path.join(out_dir, f"loss-w3-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_sharded_state_gathered_losses_checkpoints_and_resharding(tmp_path):
    out = str(tmp_path)
    mp.spawn(_two_workers, args=(file_rendezvous(out, "two"), out), nprocs=2, join=True)
    mp.spawn(_three_workers, args=(file_rendezvous(out, "three"), out), nprocs=3, join=True)

    # 3 -> 1: the whole state in one process equals the reference after all steps
    ref = _reference_after(len(SIZES))
    local = GammaContrastiveLoss(1, GammaSettings(), distributed=False)
    local.load_shards(torch.load(os.path.join(out, f"loss-w3-rank{r}.pt"), weights_only=False) for r in range(3))
    for c in range(2):
        _same(local.store.tables[c], ref.store.tables[c])

    # the memory figures each worker measured (printed for the record)
    for r in range(2):
        held, allocated, peak_extra, reset = map(int, open(os.path.join(out, f"mem-{r}.txt")).read().split())
        print(f"rank {r}: 1e8-entry state, {held / 2**20:.1f} MiB held, RSS grew {allocated / 2**20:.1f} MiB, "
              f"10 steps of batch 512 added {peak_extra / 2**20:.2f} MiB at peak (reset={reset})")
        assert held == 400_000_000
