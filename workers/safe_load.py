"""Checkpoint files are data, not code: nothing in a checkpoint runs when a run resumes from it.

Anyone who can write to a run's storage can put a pickle in it whose `__reduce__` runs a command on
every worker that resumes. So:

- gammaray's own files (loss state, RNG state, audit counts, the portable optimizer copy, the DDP
  state, the exported heads) are read with `torch.load(weights_only=True)`: tensors, numbers,
  strings and containers only (plus numpy arrays, as arrays, in the RNG state);
- DeepSpeed 0.19 reads its own files with `torch.load(weights_only=False)` (its
  TorchCheckpointEngine), out of our hands. Before DeepSpeed sees a checkpoint,
  `check_deepspeed_files` lists the globals that each of its `.pt` files references (torch's static
  scan of the pickle: nothing is executed) and refuses the checkpoint when one is neither in torch's
  weights-only allowlist nor one of the plain data classes DeepSpeed writes. A pickle can only call
  what it names as a global, so that closes the door DeepSpeed leaves open.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import numpy as np
import torch

from gammaray.config import RunError

# what DeepSpeed 0.19 pickles besides tensors and containers (seen in ZeRO 0-3, fp32 and bf16
# checkpoints): an IntEnum, the loss scaler's attributes, a dataclass of offsets
DEEPSPEED_DATA_CLASSES = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
# numpy's RNG state (np.random.get_state()) holds an array: allowed as an array, nothing else
_NUMPY_ARRAYS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]


class UnsafeCheckpoint(RunError):
    """A checkpoint file that would run code (or that cannot be checked) when loaded."""


def _refusal(shown: str, why: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"{shown}: refused to load: {why}. A checkpoint holds only tensors and plain values; this file was "
        f"not written by gammaray (or was altered). Restore the run's storage from a trusted copy, or start a new "
        f"run (another run.name).")


def load(path: str, shown: str | None = None, numpy_arrays: bool = False, map_location: Any = "cpu") -> Any:
    """torch.load of one of gammaray's own files, as data only; `shown` names the file in errors."""
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_NUMPY_ARRAYS):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.findall(r"GLOBAL (\S+)", str(err))
        raise _refusal(shown or path, f"it references code, not only data ({', '.join(named) or str(err)[:200]})") from None


def check_deepspeed_files(folder: str, shown: str | None = None) -> None:
    """Refuse a DeepSpeed checkpoint folder if any of its .pt files names a global outside torch's
    weights-only allowlist and DEEPSPEED_DATA_CLASSES (a static scan: nothing is loaded)."""
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            where = os.path.join(shown, os.path.relpath(path, folder)) if shown else path
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as err:  # noqa: BLE001 - not a torch zip file: cannot be checked
                raise _refusal(where, f"it cannot be checked ({type(err).__name__}: {err})") from None
            unknown = sorted(set(found) - DEEPSPEED_DATA_CLASSES)
            if unknown:
                raise _refusal(where, f"it references code, not only data ({', '.join(unknown[:5])})")
