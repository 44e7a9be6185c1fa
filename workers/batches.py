"""A rank's batches: batches as tensors on the device, the stand-in batch of a rank whose part ran
out, and the lockstep walk that keeps every rank in the same collectives (agreed once per epoch for
training, per batch for evaluation). A stream's spec is StreamSpec.from_config (pipelines/stream.py)."""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from gammaray.config import GammarayConfig
from gammaray.schema import BatchKeys as K
from pipelines.stream import StreamBatch
from workers.losses.phases import phase


# --------------------------------------------------------------------------------------------
# batches across ranks


def to_torch(arrays: dict[str, np.ndarray], device: torch.device, pin: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a batch. An array over a read-only buffer (Arrow's, zero-copy) is copied once, by
    torch.tensor, straight to `device`: a CPU tensor sharing it would let an in-place op write memory
    Arrow owns. Writable arrays stay zero-copy on the CPU. `pin` (a GPU device): through pinned host
    memory with non_blocking, so the copy runs while the GPU still works on the previous step."""

    def tensor(v: np.ndarray) -> torch.Tensor:
        v = np.ascontiguousarray(v)
        if pin and device.type == "cuda":
            return torch.from_numpy(v if v.flags.writeable else v.copy()).pin_memory().to(device, non_blocking=True)
        return torch.from_numpy(v).to(device) if v.flags.writeable else torch.tensor(v, device=device)

    return {k: tensor(v) for k, v in arrays.items()}


def distinct_indices(index: np.ndarray) -> bool:
    """Whether a batch's sample indices are all different (a host array: no device read)."""
    flat = np.asarray(index).reshape(-1)
    return flat.size < 2 or np.unique(flat).size == flat.size


def placeholder_batch(cfg: GammarayConfig, with_aug: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-row stand-in for a rank whose part ran out first: it takes the step with weight 0 so
    that every rank runs the same collectives (DeepSpeed gradient reduction, the loss-state exchange)."""
    H, L = cfg.data.image_size, cfg.data.max_text_tokens
    ids = torch.zeros(1, L, dtype=torch.long)
    mask = torch.zeros(1, L, dtype=torch.long)
    mask[0, 0] = 1
    b = {K.SAMPLE_INDEX: torch.zeros(1, dtype=torch.long), K.PIXELS: torch.zeros(1, 3, H, H),
         K.INPUT_IDS: ids, K.ATTENTION_MASK: mask}
    pair = cfg.data.view_pair
    if pair == "text_text":
        del b[K.PIXELS]
        b.update({K.INPUT_IDS_PAIR: ids.clone(), K.ATTENTION_MASK_PAIR: mask.clone()})
    elif pair == "image_image":
        del b[K.INPUT_IDS], b[K.ATTENTION_MASK]
        b[K.PIXELS_PAIR] = torch.zeros(1, 3, H, H)
    if with_aug:
        b.update({K.PIXELS_AUG: torch.zeros(1, 3, H, H), K.INPUT_IDS_AUG: ids.clone(), K.ATTENTION_MASK_AUG: mask.clone()})
    return {k: v.to(device) for k, v in b.items()}


def lockstep(batches: Iterator[StreamBatch], device: torch.device,
             clock: dict | None = None) -> Iterator[tuple[StreamBatch | None, int, bool]]:
    """[dist] Yield (this rank's batch or None, global number of good rows, last) until every rank is
    done; `last` says no rank has another batch. One all_reduce per batch, one batch read ahead.
    Time spent waiting for data is added to clock["wait"]."""
    it = iter(batches)
    distributed = dist.is_initialized() and dist.get_world_size() > 1

    def pull() -> tuple[StreamBatch | None, torch.Tensor]:
        t0 = time.perf_counter()
        sb = next(it, None)  # waiting for this rank's data pipeline (not for the other ranks)
        if clock is not None:
            clock["wait"] = clock.get("wait", 0.0) + time.perf_counter() - t0
        flag = torch.tensor([0 if sb is None else 1, 0 if sb is None else sb.size], dtype=torch.long, device=device)
        if distributed:
            dist.all_reduce(flag)
        return sb, flag

    cur, flag = pull()
    if int(flag[0]) == 0:
        return
    while True:
        nxt, nflag = pull()
        last = int(nflag[0]) == 0
        yield cur, int(flag[1]), last
        if last:
            return
        cur, flag = nxt, nflag


def batches_left(records_left: int, batch_size: int, device: torch.device) -> int:
    """[dist] How many lockstep batches the ranks take for the rest of an epoch: the most any rank can
    need, ceil(records left / batch size) (a batch holds batch_size good rows, so rejected records
    only make a rank need fewer). One all_reduce and host read per (re)start of an epoch, not per step."""
    n = -(-max(0, int(records_left)) // int(batch_size))
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t[0])
    return n


class Lockstep:
    """[dist] The training loop's walk over a rank's batches: yields (this rank's batch or None, its
    tensors on the device, global number of good rows, last) with no per-step host read.

    One process: the batches of the stream, read one ahead (`last` is the stream's end). Several:
    exactly `steps` batches on every rank (`batches_left`, agreed once per epoch; a checkpoint keeps
    `left` so that a resumed run takes the same steps); a rank whose stream ends first takes stand-in
    steps. The global row count is all-reduced on the device (a tensor, never
    read on the host: it only weights the loss). The next batch is copied to the device (pinned,
    non_blocking with `pin`) before the current one is yielded, so the copy overlaps the step.
    Time spent waiting for data is added to clock["wait"].

    A rank's batch count is only known up to the records its stream rejects: when every rank's
    stream rejected a whole batch's worth, the walk ends with a step of stand-ins only (weight 0)."""

    def __init__(self, batches: Iterator[StreamBatch], device: torch.device, steps: int | None = None,
                 clock: dict | None = None, pin: bool = False):
        self.it = iter(batches)
        self.device = device
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and steps is None:
            raise ValueError("a distributed lockstep needs the planned number of steps (batches_left)")
        self.total = steps
        self.done = 0
        self.clock = clock
        self.pin = pin

    @property
    def left(self) -> int | None:
        return None if self.total is None else self.total - self.done

    def _pull(self) -> tuple[StreamBatch | None, dict[str, torch.Tensor] | None]:
        t0 = time.perf_counter()
        with phase("step/data"):
            sb = next(self.it, None)  # waiting for this rank's data pipeline (not for the other ranks)
            if self.clock is not None:
                self.clock["wait"] = self.clock.get("wait", 0.0) + time.perf_counter() - t0
            tensors = to_torch(sb.arrays, self.device, self.pin) if sb is not None and sb.size > 0 else None
            if tensors is not None and K.SAMPLE_INDEX in sb.arrays:
                tensors[K.SAMPLE_INDEX_DISTINCT] = distinct_indices(sb.arrays[K.SAMPLE_INDEX])  # type: ignore[assignment]
        return sb, tensors

    def __iter__(self) -> Iterator[tuple[StreamBatch | None, dict[str, torch.Tensor] | None, Any, bool]]:
        cur = self._pull()
        if not self.distributed:
            while cur[0] is not None:
                nxt = self._pull()
                self.done += 1
                yield cur[0], cur[1], cur[0].size, nxt[0] is None
                cur = nxt
            return
        while self.done < self.total:
            sb, tensors = cur
            # a fill, not torch.tensor(..., device=): a blocking host-to-device copy waits for the GPU
            n = torch.full((1,), 0 if sb is None else sb.size, dtype=torch.long, device=self.device)
            dist.all_reduce(n)  # no read: the loss weight is computed on the device
            self.done += 1
            last = self.done >= self.total
            cur = self._pull() if not last else (None, None)
            yield sb, tensors, n[0], last
