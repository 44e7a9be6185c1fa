"""Per-sample memory of the Gamma rate (the E-step state), single-process or sharded.

Each direction (image anchors, text anchors) keeps log R_i for every sample_index i, as float32 with
NaN meaning "never visited". Logs, because R_i = E[exp(s)] overflows float32 once 1/tau is large.

`ShardedRateStore` spreads the entries over the training processes: sample i lives on rank
i mod W at slot i div W, so a process holds ceil(N/W) floats per direction and no process holds all
N. A step sends each (index, log Z_hat) pair to its owner with one all_to_all, the owner applies the
EMA, and the updated log R comes back with a second all_to_all: O(batch) traffic, no gather.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


def ema_log(old: torch.Tensor, new: torch.Tensor, gamma: float) -> torch.Tensor:
    """log((1-gamma) exp(old) + gamma exp(new)), with a NaN old meaning first visit (-> new)."""
    if gamma >= 1.0:
        return new.clone()
    mixed = torch.logaddexp(old + math.log1p(-gamma), new + math.log(gamma))
    return torch.where(torch.isnan(old), new, mixed)


def _combine_duplicates(index: torch.Tensor, log_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique indices, the log of the mean Z of their occurrences, and the inverse map."""
    uniq, inverse = torch.unique(index, sorted=True, return_inverse=True)
    if uniq.numel() == index.numel():
        out = torch.empty_like(log_z)
        out[inverse] = log_z
        return uniq, out, inverse
    counts = torch.zeros(uniq.numel(), dtype=log_z.dtype, device=log_z.device).index_add_(0, inverse, torch.ones_like(log_z))
    m = torch.full((uniq.numel(),), -math.inf, dtype=log_z.dtype, device=log_z.device)
    m = m.scatter_reduce(0, inverse, log_z, reduce="amax")
    s = torch.zeros_like(m).index_add_(0, inverse, torch.exp(log_z - m[inverse]))
    return uniq, m + torch.log(s) - torch.log(counts), inverse


class LocalRateStore:
    """All N entries in one process (single-process training, notebooks, the reference)."""

    def __init__(self, num_samples: int, device: torch.device | str = "cpu"):
        self.num_samples = int(num_samples)
        self.log_rate = torch.full((self.num_samples,), math.nan, dtype=torch.float32, device=device)

    def _ensure(self, max_index: int) -> None:
        if max_index >= self.num_samples:  # an appended catalogue grows the memory
            grow = torch.full((max_index + 1 - self.num_samples,), math.nan, dtype=torch.float32, device=self.log_rate.device)
            self.log_rate = torch.cat([self.log_rate, grow])
            self.num_samples = max_index + 1

    @torch.no_grad()
    def update(self, index: torch.Tensor, log_z: torch.Tensor, gamma: float) -> torch.Tensor:
        """EMA-update the entries of `index` with log Z_hat; returns the updated log R per input."""
        if index.numel() == 0:
            return log_z.new_empty(0)
        index = index.to(self.log_rate.device).long()
        self._ensure(int(index.max()))
        uniq, lz, inverse = _combine_duplicates(index, log_z.detach().float().to(self.log_rate.device))
        new = ema_log(self.log_rate[uniq], lz, gamma)
        self.log_rate[uniq] = new
        return new[inverse].to(log_z.device)

    @torch.no_grad()
    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.log_rate[index.to(self.log_rate.device).long()].clone()

    def state_dict(self) -> dict:
        return {"log_rate": self.log_rate.clone(), "num_samples": self.num_samples, "rank": 0, "world_size": 1}

    def load_state_dict(self, state: dict) -> None:
        self.load_shards([state])

    def load_shards(self, shards: Iterable[dict]) -> None:
        """Load from the shards of a store saved with any world size."""
        for sd in shards:
            n = int(sd["num_samples"])
            self._ensure(n - 1)
            W, r = int(sd["world_size"]), int(sd["rank"])
            glob = r + W * torch.arange(sd["log_rate"].numel())
            self.log_rate[glob.to(self.log_rate.device)] = sd["log_rate"].to(self.log_rate)

    def nbytes(self) -> int:
        return self.log_rate.numel() * self.log_rate.element_size()


class ShardedRateStore:
    """Entries owned by rank i mod W; requires an initialised torch.distributed process group."""

    def __init__(self, num_samples: int, group=None, device: torch.device | str = "cpu"):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device)
        self.num_samples = int(num_samples)
        self.log_rate = torch.full((self._local_len(self.num_samples),), math.nan, dtype=torch.float32, device=self.device)

    def _local_len(self, n: int) -> int:
        return max(0, (n - self.rank + self.world_size - 1) // self.world_size)

    def _ensure(self, num_samples: int) -> None:
        if num_samples > self.num_samples:
            extra = self._local_len(num_samples) - self.log_rate.numel()
            self.log_rate = torch.cat([self.log_rate, torch.full((extra,), math.nan, dtype=torch.float32, device=self.device)])
            self.num_samples = num_samples

    def _exchange(self, send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        counts = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
        recv_counts_t = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts_t, counts, group=self.group)
        recv_counts = recv_counts_t.tolist()
        recv = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
        dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group)
        return recv, recv_counts

    @torch.no_grad()
    def update(self, index: torch.Tensor, log_z: torch.Tensor, gamma: float) -> torch.Tensor:
        """Collective: every rank must call it each step, with its own (possibly empty) batch."""
        index = index.to(self.device).long()
        log_z = log_z.detach().to(self.device, torch.float64)
        # the catalogue size can only grow; agree on it so every rank shards the same N
        n = torch.tensor([self.num_samples, int(index.max()) + 1 if index.numel() else 0], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=self.group)
        self._ensure(int(n.max()))

        owner = index % self.world_size
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.world_size).tolist()
        # (index, log z) packed as float64: indices below 2**53 are exact
        payload = torch.stack([index[order].double(), log_z[order]], dim=1)
        recv, recv_counts = self._exchange(payload, send_counts)

        r_index = recv[:, 0].long()
        r_logz = recv[:, 1].float()
        if r_index.numel():
            slots = r_index // self.world_size
            uniq, lz, inverse = _combine_duplicates(slots, r_logz)
            new = ema_log(self.log_rate[uniq], lz, gamma)
            self.log_rate[uniq] = new
            reply = new[inverse].double()
        else:
            reply = recv.new_empty((0,))
        back = reply.new_empty((sum(send_counts),))
        dist.all_to_all_single(back, reply, output_split_sizes=send_counts, input_split_sizes=recv_counts, group=self.group)
        out = torch.empty_like(back)
        out[order] = back
        return out.float()

    def state_dict(self) -> dict:
        return {"log_rate": self.log_rate.clone().cpu(), "num_samples": self.num_samples, "rank": self.rank,
                "world_size": self.world_size}

    def load_shards(self, shards: Iterable[dict]) -> None:
        """Load the entries this rank owns from shards saved with any world size (re-sharding).

        Shards are visited one at a time, so peak memory is this rank's part plus one old shard."""
        for sd in shards:
            self._ensure(int(sd["num_samples"]))
            W, r = int(sd["world_size"]), int(sd["rank"])
            vals = sd["log_rate"].to(self.device)
            glob = r + W * torch.arange(vals.numel(), device=self.device)
            mine = glob % self.world_size == self.rank
            self.log_rate[glob[mine] // self.world_size] = vals[mine]

    def nbytes(self) -> int:
        return self.log_rate.numel() * self.log_rate.element_size()
