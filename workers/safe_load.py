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
  what it names as a global, so that closes the door DeepSpeed leaves open;
- a checkpoint folder holds regular files and folders only (`check_no_links`): a symbolic link could
  point DeepSpeed (which follows links) or a check (which does not) at files outside the checkpoint;
- other libraries' pickles read from storage (Ray Tune's experiment state, tuning/state_check.py) are
  checked with `pickle_references`: the globals a pickle names and the ones it calls, read from its
  opcodes without loading it, against the allowlists of what those libraries write.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import pickletools
import re
import stat
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


CHECKPOINT_ADVICE = ("A checkpoint holds only tensors and plain values; this file was not written by gammaray (or "
                     "was altered). Restore the run's storage from a trusted copy, or start a new run (another run.name).")


def refusal(shown: str, why: str, advice: str = CHECKPOINT_ADVICE) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{shown}: refused to load: {why}. {advice}")


def load(path: str, shown: str | None = None, numpy_arrays: bool = False, map_location: Any = "cpu") -> Any:
    """torch.load of one of gammaray's own files, as data only; `shown` names the file in errors."""
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_NUMPY_ARRAYS):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.findall(r"GLOBAL (\S+)", str(err))
        raise refusal(shown or path, f"it references code, not only data ({', '.join(named) or str(err)[:200]})") from None


def check_no_links(folder: str, shown: str | None = None) -> None:
    """Refuse a checkpoint folder that is, or holds, anything but regular files and folders: a
    symbolic link (to a file or a folder, inside the checkpoint or not), a FIFO, a device. Ray writes
    checkpoints as plain copies; a link only gets there by hand, and DeepSpeed follows links where
    os.walk does not, so a linked folder's files would be loaded unchecked."""
    shown = shown or folder
    if os.path.islink(folder):
        raise refusal(shown, f"it is a symbolic link (to {os.readlink(folder)})")
    for root, dirs, files in os.walk(folder):  # does not enter linked folders: they are refused here
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            where = os.path.join(shown, os.path.relpath(path, folder))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise refusal(where, f"it is a symbolic link (to {os.readlink(path)}); a checkpoint holds "
                                      "regular files only")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise refusal(where, "it is not a regular file (a FIFO, socket or device)")


def check_deepspeed_files(folder: str, shown: str | None = None) -> None:
    """Refuse a DeepSpeed checkpoint folder if it holds a link or anything but regular files
    (`check_no_links`), or if any of its .pt files names a global outside torch's weights-only
    allowlist and DEEPSPEED_DATA_CLASSES (a static scan: nothing is loaded)."""
    check_no_links(folder, shown)
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".pt"):
                continue
            path = os.path.join(root, name)
            check_torch_file(path, os.path.join(shown, os.path.relpath(path, folder)) if shown else path,
                             DEEPSPEED_DATA_CLASSES)


def check_torch_file(f, shown: str, allowed: frozenset[str]) -> None:
    """Refuse a torch.save file (a path or a seekable file object) whose pickle names a global outside
    torch's weights-only allowlist and `allowed`: torch's static scan, which reads only the pickle
    (seeks into the zip), never the tensors, and runs nothing."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception as err:  # noqa: BLE001 - not a torch zip file: cannot be checked
        raise refusal(shown, f"it cannot be checked ({type(err).__name__}: {str(err)[:200]})") from None
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise refusal(shown, f"it references code, not only data ({', '.join(unknown[:5])})")


# what any of a checkpoint's .pt files may name, beyond torch's weights-only allowlist (the driver's
# check; each file is then loaded against its own, narrower list)
CHECKPOINT_GLOBALS = DEEPSPEED_DATA_CLASSES | {f"{o.__module__}.{o.__qualname__}" for o in _NUMPY_ARRAYS}


# --------------------------------------------------------------------------------------------
# any pickle, read without loading it

_CALLS = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}  # opcode -> stack depth of the callable
_NOT_CHECKABLE = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}  # callables from outside the stream


class _Global(str):
    """A global named by the pickle (as the symbolic stack sees it)."""


class _Unchecked(ValueError):
    """A stream that may load but cannot be checked (always refused, nested or not)."""


def pickle_references(data: bytes, hex_strings: bool = False, lenient: bool = False) -> tuple[set[str], set[str]]:
    """(called, named): the globals a pickle calls (REDUCE, NEWOBJ, OBJ, INST: a constructor or a
    function run at load time) and every global it names, read from its opcodes without loading it
    (a symbolic stack: only names and strings are followed). Pickles nested in it (bytes, and with
    `hex_strings` hex text, that start like a pickle) are read too. Raises ValueError for what
    cannot be checked: a call of something that is not a named global (a call's result, a
    duplicate), extension codes, persistent ids, and (unless `lenient`: the references before the
    first bad opcode, for text that may not be a pickle at all) a malformed stream."""
    called: set[str] = set()
    named: set[str] = set()
    _scan(data, called, named, hex_strings, strict=not lenient)
    return called, named


def _nested(value: Any, called: set[str], named: set[str], hex_strings: bool) -> None:
    """A pickle inside a pickle (bytes, or hex text as Ray Tune stores them) is read leniently: an
    unpickler stops at the first bad opcode, so the references before it are what could run."""
    if isinstance(value, (bytes, bytearray)) and value[:1] == b"\x80":
        _scan(bytes(value), called, named, hex_strings, strict=False)
    elif hex_strings and isinstance(value, str) and len(value) >= 4 and len(value) % 2 == 0 and value[:2] == "80":
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            return
        _scan(raw, called, named, hex_strings, strict=False)


def _scan(data: bytes, called: set[str], named: set[str], hex_strings: bool, strict: bool) -> None:
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in _NOT_CHECKABLE:
                if not strict and name in ("PERSID", "BINPERSID"):
                    # text read as a maybe-pickle (an id such as "5109ab6a" decodes to BINPERSID ...): plain
                    # pickle.loads has no persistent_load and stops here with an error, so nothing after it runs
                    return
                if not strict and name.startswith("EXT") and arg not in copyreg._inverted_registry:
                    # the same for an extension code nobody registered (a trial id such as "82c1..."):
                    # pickle.loads stops there with "unregistered extension code"
                    return
                raise _Unchecked(f"opcode {name} (a callable from outside the stream)")
            if name == "MARK":
                marks.append(stack)
                stack = []
            elif name in ("GLOBAL", "INST"):
                ref = _Global(arg.replace(" ", "."))
                named.add(ref)
                if name == "INST":  # class and its arguments: a call
                    called.add(ref)
                    stack = marks.pop()
                    stack.append(None)
                else:
                    stack.append(ref)
            elif name == "STACK_GLOBAL":
                module, qualname = stack[-2], stack[-1]
                if not (type(module) is str and type(qualname) is str):
                    raise _Unchecked("a global whose name is not a plain string")
                ref = _Global(f"{module}.{qualname}")
                named.add(ref)
                del stack[-2:]
                stack.append(ref)
            elif name in _CALLS:
                fn = stack[-_CALLS[name]]
                if not isinstance(fn, _Global):
                    raise _Unchecked(f"{name} of something that is not a named global (code built in the stream)")
                called.add(fn)
                del stack[-_CALLS[name]:]
                stack.append(None)
            elif name == "OBJ":
                items = stack
                stack = marks.pop()
                if not items or not isinstance(items[0], _Global):
                    raise _Unchecked("OBJ of something that is not a named global (code built in the stream)")
                called.add(items[0])
                stack.append(None)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("FRAME", "PROTO", "STOP"):
                pass
            else:
                _nested(arg, called, named, hex_strings)
                before = op.stack_before
                if pickletools.markobject in before:
                    below = before.index(pickletools.markobject)
                    stack = marks.pop()
                else:
                    below = len(before)
                if below:
                    if len(stack) < below:
                        raise ValueError(f"{name} on a short stack")
                    del stack[-below:]
                pushed = [arg if type(arg) is str else None for _ in op.stack_after]
                stack.extend(pushed)
    except _Unchecked:
        raise
    except (ValueError, IndexError, KeyError) as err:
        if strict:
            raise ValueError(f"not a pickle that can be checked ({type(err).__name__}: {err})") from None


def check_pickle(data: bytes, shown: str, calls: frozenset[str], values: frozenset[str] = frozenset(),
                 hex_strings: bool = False, advice: str = CHECKPOINT_ADVICE) -> None:
    """Refuse (UnsafeCheckpoint naming `shown`) a pickle that calls a global outside `calls` or names
    one outside `calls | values`; nothing is loaded."""
    try:
        called, named = pickle_references(data, hex_strings)
    except ValueError as err:
        raise refusal(shown, f"it cannot be checked ({err})", advice) from None
    bad = sorted((called - calls) | (named - calls - values))
    if bad:
        raise refusal(shown, f"it references code, not only data ({', '.join(bad[:5])})", advice)
