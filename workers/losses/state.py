"""Per-sample memory of the Gamma rate (the E-step state), single-process or sharded.

The store keeps log R_i for every sample_index i in one or more *channels* (the gamma loss uses two:
image anchors and text anchors, each direction with its own state), as float32 with NaN meaning "never
visited". Logs, because R_i = E[exp(s)] overflows float32 once 1/tau is large. The channels are the
rows of one [K, N] tensor (`table`; `tables[c]` is row c, a contiguous 1-D view), so a store of N
samples and 2 channels holds exactly 8 N bytes and a step reads and writes every channel at once.

`ShardedRateStore` spreads the entries over the training processes: sample i lives on rank i mod W at
slot i div W, so a process holds ceil(N/W) floats per channel and no process holds all N. A step
sends each (index, log Z_hat per channel) row to its owner with one all_to_all (after a tiny one for
the counts), the owner applies the EMA, and the updated log R comes back with a third all_to_all:
O(batch) traffic per step, every channel in the same exchange, no gather of the state.

An input log Z_hat of NaN means "no observation" (an anchor that had no negative this step): the
entry is left as it was and its current value is returned.

`scale` (default 1): the table holds log R / scale, so a model whose logit scale moves reads its old
entries rescaled to the current scale (R^(scale_now / scale_then)) before the EMA mixes in the new
observation, instead of mixing rates measured at different temperatures.

Age (optional, `track_age`): the store counts its updates (one per training step: `update` is called
every step, on every rank) and remembers, per sample, the update that last touched it; after each
update `last_age` holds, per input row, how many updates ago its entry was last written (NaN for a
first visit). 4 more bytes per sample; diagnostic only, so it is not checkpointed (after a resume,
ages count from the resume).

Fixed-size updates (`capacity`, the training step's path): with the largest batch a rank can send
known (the micro-batch), an update makes no host read at all. Every rank sends W blocks of
`capacity` rows (padding rows carry index -1), one all_to_all with equal splits instead of the counts
exchange, duplicates are combined over sorted segments instead of `torch.unique`, and index checks
run on the device (`torch._assert_async`): the step never waits for the accelerator. The store must
then cover every index it is given (the training loop sizes it from the manifest); without
`capacity` the store grows to the largest index seen and validates on the host. In one process, when
every anchor observed something (the usual batch), `LocalRateStore.update_observed` is that update
in about half the operations: channel-major rows straight from the estimate, no masks for missing
observations, duplicates combined by one matrix product.

Checkpoints: `state_dict(channel)` is one channel of this process's shard, *without a copy* (save it
before the next update); `load_shards(channel, shards)` takes the shards of a store saved with any
world size, one at a time, and copies the entries this process owns with strided slices, so peak
memory while re-sharding is this process's part plus one old shard.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


def ema_log(old: torch.Tensor, new: torch.Tensor, gamma: float) -> torch.Tensor:
    """log((1-gamma) exp(old) + gamma exp(new)); a NaN old (first visit) gives new, a NaN new
    (no observation) keeps old."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"EMA weight gamma must be in (0, 1], got {gamma}")
    if gamma >= 1.0:
        mixed = new
    else:
        mixed = torch.logaddexp(old + math.log1p(-gamma), new + math.log(gamma))
    out = torch.where(torch.isnan(old), new, mixed)
    return torch.where(torch.isnan(new), old, out)


def combine_duplicates(index: torch.Tensor, log_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique indices, per unique index and channel the log of the mean Z over its non-NaN
    occurrences (NaN if none), and the inverse map. log_z is [B, K]."""
    srt, perm = torch.sort(index)
    if srt.numel() < 2 or not bool((srt[1:] == srt[:-1]).any()):  # the usual case: no duplicates
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return srt, log_z[perm], inverse
    uniq, inverse = torch.unique(index, sorted=True, return_inverse=True)
    seen = ~torch.isnan(log_z)
    lz = torch.where(seen, log_z, torch.full_like(log_z, -math.inf))
    U, K = uniq.numel(), log_z.shape[1]
    idx = inverse[:, None].expand(-1, K)
    counts = torch.zeros(U, K, dtype=log_z.dtype, device=log_z.device).scatter_add_(0, idx, seen.to(log_z.dtype))
    m = torch.full((U, K), -math.inf, dtype=log_z.dtype, device=log_z.device).scatter_reduce(0, idx, lz, reduce="amax")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros_like(m).scatter_add_(0, idx, torch.exp(lz - m_safe.gather(0, idx)))
    out = m_safe + torch.log(s) - torch.log(counts)
    return uniq, torch.where(counts > 0, out, torch.full_like(out, math.nan)), inverse


def _out_dtype(log_z: torch.Tensor) -> torch.dtype:
    return torch.float64 if log_z.dtype == torch.float64 else torch.float32


SMALL_EXCHANGE = 512  # rows an update compares pairwise (an [m, m, K] float64 temporary: 4 MiB at 512, K = 2)


def _combine_by_comparison(slots: torch.Tensor, lz: torch.Tensor) -> torch.Tensor:
    """Per row, log of the mean Z over the observed rows (lz not NaN) of its slot, NaN if none:
    every row compared with every other. lz is [m, K] float64."""
    member = (slots[:, None] == slots[None, :])[:, :, None] & ~torch.isnan(lz)[None, :, :]  # [m, m, K]
    total = torch.logsumexp(torch.where(member, lz[None, :, :], -math.inf), dim=1)
    return total - torch.log(member.sum(1, dtype=lz.dtype))  # no observation: -inf - log 0 = NaN


def _combine_by_sorting(slots: torch.Tensor, lz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same over sorted segments: (sorted slots, the sort's permutation, the combined value per
    sorted row)."""
    m, K = lz.shape
    srt, perm = torch.sort(slots, stable=True)
    lz = lz[perm]
    start = torch.ones(m, dtype=torch.bool, device=slots.device)
    start[1:] = srt[1:] != srt[:-1]
    seg = (torch.cumsum(start, 0) - 1)[:, None].expand(-1, K)
    seen = ~torch.isnan(lz)
    lzs = torch.where(seen, lz, torch.full_like(lz, -math.inf))
    counts = torch.zeros(m, K, dtype=lz.dtype, device=lz.device).scatter_add_(0, seg, seen.to(lz.dtype))
    top = torch.full((m, K), -math.inf, dtype=lz.dtype, device=lz.device).scatter_reduce(0, seg, lzs, reduce="amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros_like(top).scatter_add_(0, seg, torch.exp(lzs - top.gather(0, seg)))
    comb = (top + torch.log(sums) - torch.log(counts)).gather(0, seg)
    return srt, perm, torch.where(counts.gather(0, seg) > 0, comb, torch.full_like(comb, math.nan))


def _check_index(index: torch.Tensor) -> None:
    if index.numel() and int(index.min()) < 0:
        bad = int(index[index < 0][0])
        raise ValueError(f"sample_index must be >= 0 (got {bad}); it is the dense index assigned by `gammaray prepare`")


class _Store:
    """Shared logic: rank r of W owns the samples i with i mod W == r, at slot i div W."""

    rank: int
    world_size: int

    def __init__(self, num_samples: int, channels: int, device: torch.device | str, track_age: bool = False):
        if channels < 1:
            raise ValueError(f"a rate store needs at least one channel, got {channels}")
        self.device = torch.device(device)
        self.channels = int(channels)
        self.num_samples = int(num_samples)
        n = self._local_len(self.num_samples)
        # one [K, n] tensor whose rows are the channels' tables: a step gathers and writes every
        # channel in one operation, and each table stays a contiguous 1-D tensor of its own
        self._set_table(torch.full((channels, n), math.nan, dtype=torch.float32, device=self.device))
        self.updates = 0
        self.last_update = torch.full((n,), -1, dtype=torch.int32, device=self.device) if track_age else None
        self.last_age: torch.Tensor | None = None

    # -- layout
    def _set_table(self, table: torch.Tensor) -> None:
        self.table = table
        self.tables = list(table.unbind(0))

    def _local_len(self, n: int) -> int:
        return max(0, (n - self.rank + self.world_size - 1) // self.world_size)

    def _ensure(self, num_samples: int) -> None:
        """Grow to cover sample indices < num_samples (an appended catalogue grows the memory)."""
        if num_samples <= self.num_samples:
            return
        extra = self._local_len(num_samples) - self.tables[0].numel()
        if extra > 0:
            t = self.table
            self._set_table(torch.cat([t, torch.full((t.shape[0], extra), math.nan, dtype=t.dtype, device=t.device)], 1))
            if self.last_update is not None:
                self.last_update = torch.cat([self.last_update, self.last_update.new_full((extra,), -1)])
        self.num_samples = num_samples

    @property
    def log_rate(self) -> torch.Tensor:
        """Channel 0 (the only one of a one-channel store)."""
        return self.tables[0]

    def _apply(self, slots: torch.Tensor, log_z: torch.Tensor, gamma: float, scale: float = 1.0) -> torch.Tensor:
        """EMA-update local slots with log_z [m, K] (duplicates combined). The update is computed in
        float64 and returned as such (so gamma = 1 returns the input exactly); the table keeps float32
        (log R / scale). With age tracking one more column: the slot's age before this update."""
        uniq, lz, inverse = combine_duplicates(slots, log_z.double())
        new = torch.empty_like(lz)
        for c, table in enumerate(self.tables):
            upd = ema_log(table[uniq].double() * scale, lz[:, c], gamma)
            table[uniq] = (upd / scale).to(table.dtype)
            new[:, c] = upd
        if self.last_update is not None:
            last = self.last_update[uniq]
            age = torch.where(last >= 0, (self.updates - last).double(), torch.full_like(last, math.nan, dtype=torch.float64))
            self.last_update[uniq] = self.updates
            new = torch.cat([new, age[:, None]], dim=1)
        return new[inverse]

    def _apply_rows(self, slots: torch.Tensor, valid: torch.Tensor | None, log_z: torch.Tensor, gamma: float,
                    scale) -> torch.Tensor:
        """`_apply` without a host read: the same combination of duplicates (log of the mean Z over a
        slot's observed rows) and the same EMA, written row by row (duplicates write the same value).
        Up to SMALL_EXCHANGE rows the duplicates are found by comparing every row with every other
        (a dozen operations), above that over sorted segments of the slots (m log m work instead of
        m^2). Rows with valid False are padding: they point at slot 0 with no observation and leave
        it (and its age) as it was; valid None: every row is real."""
        m, K = log_z.shape
        if valid is None:  # every row is real (one process)
            lz = log_z.double()
        else:
            slots = torch.where(valid, slots, torch.zeros_like(slots))
            lz = torch.where(valid[:, None], log_z.double(), torch.full_like(log_z, math.nan, dtype=torch.float64))
        if m <= SMALL_EXCHANGE:
            rows, perm, comb = slots, None, _combine_by_comparison(slots, lz)
        else:
            rows, perm, comb = _combine_by_sorting(slots, lz)
        # every channel in one EMA (the tables stay one tensor per channel)
        unit = isinstance(scale, float) and scale == 1.0
        old = torch.stack([t[rows] for t in self.tables], dim=1).double()
        new = ema_log(old if unit else old * scale, comb, gamma)
        stored = (new if unit else new / scale).to(self.tables[0].dtype)
        for c, table in enumerate(self.tables):
            table[rows] = stored[:, c]
        if self.last_update is not None:
            last = self.last_update[rows]
            age = torch.where(last >= 0, (self.updates - last).double(), torch.full_like(last, math.nan, dtype=torch.float64))
            if valid is None:
                self.last_update[rows] = self.updates
            else:
                ok = valid if perm is None else valid[perm]
                stamp = torch.where(ok, torch.full_like(last, self.updates), torch.full_like(last, -1))
                self.last_update.scatter_reduce_(0, rows, stamp, reduce="amax")
            new = torch.cat([new, age[:, None]], dim=1)
        if perm is None:
            return new
        out = torch.empty_like(new)
        out[perm] = new
        return out

    def _apply_observed(self, slots: torch.Tensor, log_z: torch.Tensor, gamma: float, scale,
                        distinct: bool = False) -> torch.Tensor:
        """`_apply_rows` for one process when every row holds an observation (no NaN, no padding),
        channel-major: log_z and the result are [K, m] (the estimate's layout, no transposes). The
        same combination of duplicates and the same EMA in about half the operations (a small
        micro-batch's step costs about the operations it launches). Returns the updated log R
        ([K, m] float64) and sets `last_age` itself.

        A slot's log-mean-exp over its rows is a product with the column-normalised slot matrix,
        shifted by the channel's largest value: exact while the rows' log Z span less than 700
        (float64's exp range; scores are bounded by the logit scale, max_logit_scale 100, so they
        span at most 4 x 100), and finite beyond (the clamp)."""
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"EMA weight gamma must be in (0, 1], got {gamma}")
        unit = isinstance(scale, float) and scale == 1.0
        # nothing to combine and no rescaling: the EMA in the table's own precision (float32: four
        # conversions fewer; within a float32 rounding of the float64 path)
        work = self.table.dtype if distinct and unit and log_z.dtype == self.table.dtype else torch.float64
        lz = log_z if log_z.dtype == work else log_z.to(work)
        if distinct:
            comb = lz
        else:
            same = (slots[:, None] == slots[None, :]).to(lz.dtype)
            top = lz.amax(1, keepdim=True)
            comb = torch.log(torch.exp((lz - top).clamp_min_(-700.0)) @ same / same.sum(0)) + top
        old = self.table.index_select(1, slots)
        old = old if old.dtype == work else old.to(work)
        if not unit:
            old = old * scale
        if gamma < 1.0:
            mixed = torch.logaddexp(old + math.log1p(-gamma), comb + math.log(gamma))
            new = torch.where(torch.isnan(old), comb, mixed)  # NaN old: a first visit
        else:
            new = comb
        # duplicates write the same value, so the order of the copies does not matter
        self.table.index_copy_(1, slots, (new if unit else new / scale).to(self.table.dtype))  # no-op to() in float32
        if self.last_update is not None:
            last = self.last_update.index_select(0, slots)
            self.last_age = (self.updates - last).float().masked_fill_(last < 0, math.nan)
            self.last_update.index_fill_(0, slots, self.updates)
        self.updates += 1
        return new

    def _check_on_device(self, index: torch.Tensor) -> None:
        """Index checks that never wait for the device (they fail at the next synchronisation)."""
        if index.numel():
            torch._assert_async(((index >= 0) & (index < self.num_samples)).all(),
                                f"sample_index must be >= 0 and < {self.num_samples} (the memory's size, from the "
                                "manifest's next_sample_index)")

    def _split_age(self, out: torch.Tensor) -> torch.Tensor:
        """Strip the age column `_apply` appends (keeping it in `last_age`) and count the update."""
        self.updates += 1
        if self.last_update is None:
            return out
        self.last_age = out[:, -1].float()
        return out[:, :-1]

    @staticmethod
    def _as_matrix(index: torch.Tensor, log_z: torch.Tensor, channels: int) -> tuple[torch.Tensor, bool]:
        one = log_z.dim() == 1
        lz = log_z.reshape(index.numel(), -1) if index.numel() else log_z.reshape(0, channels)
        if lz.shape[1] != channels:
            raise ValueError(f"log_z has {lz.shape[1]} channel(s), the store {channels}")
        return lz, one

    # -- checkpoints
    def state_dict(self, channel: int = 0) -> dict:
        """One channel of this process's shard. The tensor is the live state, not a copy (a copy
        would double the memory of a 10^8-entry state): serialise it before the next update."""
        return {"log_rate": self.tables[channel].detach().cpu(), "num_samples": self.num_samples,
                "rank": self.rank, "world_size": self.world_size}

    def load_shards(self, shards: Iterable[dict] | dict, channel: int = 0) -> None:
        """Copy the entries this process owns from shards saved with any world size (re-sharding).

        Shards are visited one at a time and copied with strided slices (no index tensors), so
        peak memory is this process's part plus one old shard."""
        if isinstance(shards, dict):
            shards = [shards]
        for sd in shards:
            self._ensure(int(sd["num_samples"]))
            vals = sd["log_rate"]
            W0, r0 = int(sd["world_size"]), int(sd["rank"])
            if not 0 <= r0 < W0:
                raise ValueError(f"loss-state shard has rank {r0} outside world size {W0}")
            expected = max(0, (int(sd["num_samples"]) - r0 + W0 - 1) // W0)
            if vals.numel() > expected:
                raise ValueError(f"loss-state shard rank {r0}/{W0}: {vals.numel()} entries, more than the "
                                 f"{expected} of a {sd['num_samples']}-sample state")
            W, r = self.world_size, self.rank
            lcm = W0 * W // math.gcd(W0, W)
            k_step, s_step = lcm // W0, lcm // W
            # old slot k holds sample r0 + W0 k; it is ours when that is r mod W
            k0 = next((k for k in range(k_step) if (r0 + W0 * k) % W == r), None)
            if k0 is None or k0 >= vals.numel():
                continue
            src = vals[k0::k_step]
            s0 = (r0 + W0 * k0) // W
            table = self.tables[channel]
            table[s0: s0 + (src.numel() - 1) * s_step + 1: s_step] = src.to(table)

    def nbytes(self) -> int:
        ages = 0 if self.last_update is None else self.last_update.numel() * self.last_update.element_size()
        return sum(t.numel() * t.element_size() for t in self.tables) + ages

    @staticmethod
    def bytes_per_worker(num_samples: int, world_size: int, channels: int = 2, track_age: bool = False) -> int:
        """What a fully grown shard of the largest rank (rank 0) holds: ceil(N/W) float32 per channel
        (+ one int32 per sample with age tracking)."""
        return -(-int(num_samples) // int(world_size)) * 4 * (channels + int(track_age))


class LocalRateStore(_Store):
    """All N entries in one process (single-process training, notebooks, the reference)."""

    def __init__(self, num_samples: int, channels: int = 1, device: torch.device | str = "cpu",
                 track_age: bool = False):
        self.rank, self.world_size = 0, 1
        super().__init__(num_samples, channels, device, track_age)

    @torch.no_grad()
    def update(self, index: torch.Tensor, log_z: torch.Tensor, gamma: float, scale=1.0,
               capacity: int | None = None) -> torch.Tensor:
        """EMA-update the entries of `index` with log Z_hat ([B] or [B, channels]); returns the
        updated log R per input row, shaped like log_z. `capacity` (any value): the fixed-size path,
        no host read (indices must be below num_samples)."""
        index = index.reshape(-1).to(self.device).long()
        lz, one = self._as_matrix(index, log_z.detach(), self.channels)
        if capacity is not None:
            self._check_on_device(index)
            new = self._split_age(self._apply_rows(index, None, lz.to(self.device), gamma, scale))
            new = new.to(log_z.device, _out_dtype(log_z))
            return new[:, 0] if one else new
        if index.numel() == 0:
            self._split_age(torch.zeros(0, self.channels + (self.last_update is not None), dtype=torch.float64))
            return log_z.detach().new_empty(log_z.shape).to(_out_dtype(log_z))
        _check_index(index)
        self._ensure(int(index.max()) + 1)
        new = self._split_age(self._apply(index, lz.to(self.device), gamma, scale)).to(log_z.device, _out_dtype(log_z))
        return new[:, 0] if one else new

    @torch.no_grad()
    def update_observed(self, index: torch.Tensor, log_z: torch.Tensor, gamma: float, scale=1.0,
                        distinct: bool = False) -> torch.Tensor:
        """`update(..., capacity=...)` for the training step's usual batch, channel-major: log_z is
        [channels, B] with no NaN (every anchor observed something), B <= SMALL_EXCHANGE; returns the
        updated log R as [channels, B]. No host read; the same values as `update`. `distinct`: the
        caller's word, checked on the host, that `index` has no duplicates (nothing to combine: about
        a third of the operations left)."""
        if index.dim() != 1:
            index = index.reshape(-1)
        if index.device != self.device or index.dtype != torch.long:
            index = index.to(self.device, torch.long)
        if log_z.shape != (self.channels, index.numel()) or index.numel() > SMALL_EXCHANGE:
            raise ValueError(f"update_observed: log_z must be [{self.channels}, B] with B = {index.numel()} <= "
                             f"{SMALL_EXCHANGE}, got {tuple(log_z.shape)}")
        on_cpu = self.device.type == "cpu"
        if not on_cpu:
            self._check_on_device(index)
        lz = log_z.detach() if log_z.requires_grad else log_z
        try:  # on CPU the gather below refuses an index out of range before anything is written
            new = self._apply_observed(index, lz if lz.device == self.device else lz.to(self.device), gamma, scale,
                                       distinct)
        except RuntimeError as e:
            if on_cpu and index.numel() and not bool(((index >= 0) & (index < self.num_samples)).all()):
                raise ValueError(f"sample_index must be >= 0 and < {self.num_samples} (the memory's size, from the "
                                 "manifest's next_sample_index)") from e
            raise
        new = new if new.device == log_z.device else new.to(log_z.device)
        return new if log_z.dtype == torch.float64 else new.float()

    @torch.no_grad()
    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(-1).to(self.device).long()
        out = torch.stack([t[index] for t in self.tables], dim=1)
        return out[:, 0] if self.channels == 1 else out


class ShardedRateStore(_Store):
    """Entries owned by rank i mod W; requires an initialised torch.distributed process group.

    `update` is a collective: every rank calls it at every step, with its own (possibly empty) batch."""

    def __init__(self, num_samples: int, channels: int = 1, group=None, device: torch.device | str = "cpu",
                 track_age: bool = False):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        super().__init__(num_samples, channels, device, track_age)

    def _exchange(self, send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        counts = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
        recv_counts_t = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts_t, counts, group=self.group)
        recv_counts = recv_counts_t.tolist()
        recv = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
        dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=self.group)
        return recv, recv_counts

    @torch.no_grad()
    def update(self, index: torch.Tensor, log_z: torch.Tensor, gamma: float, scale=1.0,
               capacity: int | None = None) -> torch.Tensor:
        if capacity is not None:
            return self._update_fixed(index, log_z, gamma, scale, int(capacity))
        out_device = log_z.device
        index = index.reshape(-1).to(self.device).long()
        lz, one = self._as_matrix(index, log_z.detach(), self.channels)
        _check_index(index)
        W, K = self.world_size, self.channels
        owner = index % W
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=W).tolist()
        # (index, log z per channel) packed as float64: indices below 2**53 are exact
        payload = torch.cat([index[order].double()[:, None], lz.to(self.device, torch.float64)[order]], dim=1)
        recv, recv_counts = self._exchange(payload, send_counts)

        cols = K + (self.last_update is not None)  # the age travels back as one more column
        if recv.shape[0]:
            r_index = recv[:, 0].long()
            self._ensure(int(r_index.max()) + 1)
            reply = self._apply(r_index // W, recv[:, 1:], gamma, scale)
        else:
            reply = recv.new_empty((0, cols))
        back = reply.new_empty((sum(send_counts), cols))
        dist.all_to_all_single(back, reply.contiguous(), output_split_sizes=send_counts,
                               input_split_sizes=recv_counts, group=self.group)
        out = torch.empty_like(back)
        out[order] = back
        out = self._split_age(out).to(out_device, _out_dtype(log_z))
        return out[:, 0] if one else out

    def _update_fixed(self, index: torch.Tensor, log_z: torch.Tensor, gamma: float, scale, P: int) -> torch.Tensor:
        """The exchange in fixed-size blocks: each rank sends every owner a block of P rows (its
        rows for that owner, then padding with index -1), so both all_to_alls have equal splits and
        nothing is read on the host."""
        out_device = log_z.device
        index = index.reshape(-1).to(self.device).long()
        lz, one = self._as_matrix(index, log_z.detach(), self.channels)
        B, W, K = index.numel(), self.world_size, self.channels
        if B > P:
            raise ValueError(f"a batch of {B} rows is larger than the exchange's capacity {P} (data.batch_size)")
        self._check_on_device(index)
        owner = index % W
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=W)
        starts = torch.cumsum(counts, 0) - counts
        owner_sorted = owner[order]
        dest = torch.empty_like(index)
        dest[order] = owner_sorted * P + torch.arange(B, device=self.device) - starts[owner_sorted]
        send = torch.full((W * P, 1 + K), math.nan, dtype=torch.float64, device=self.device)
        send[:, 0] = -1.0
        # (index, log z per channel) packed as float64: indices below 2**53 are exact
        send[dest] = torch.cat([index.double()[:, None], lz.to(self.device, torch.float64)], dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        r_index = recv[:, 0].long()
        valid = r_index >= 0
        reply = self._apply_rows(torch.where(valid, r_index // W, torch.zeros_like(r_index)), valid, recv[:, 1:],
                                 gamma, scale)
        back = torch.empty_like(reply)
        dist.all_to_all_single(back, reply.contiguous(), group=self.group)
        out = self._split_age(back[dest]).to(out_device, _out_dtype(log_z))
        return out[:, 0] if one else out
