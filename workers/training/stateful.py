"""What a checkpoint component is: something with `state_dict()` / `load_state_dict()` (the field's
convention: torch modules and optimizers, torchtitan's checkpoint states), plus `reshard` for a resume
on another worker count. workers/training/checkpoint.py saves and restores a mapping of them.

Each rank saves its own state dict. On the same worker count a rank loads its own one back
(`load_state_dict`: exact resume). On another count there is no state dict of "this rank" to load: the
component gets the state dicts of the old ranks that hold its part (`reshard`) and re-cuts them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable


@dataclass(frozen=True)
class Recut:
    """A resume on another worker count, as a component sees it."""

    rank: int            # this rank, in the new world
    world_size: int      # the new worker count
    old_world_size: int  # the count the checkpoint was saved with
    seed: int            # where random streams that cannot continue restart (workers/training/rng.py recut_seed)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


@runtime_checkable
class Reshardable(Stateful, Protocol):
    def reshard(self, shards: Iterable[dict], recut: Recut) -> None:
        """`shards`: the state dicts of the old ranks this rank's part comes from (possibly a generator:
        read one at a time), as workers/training/checkpoint.py picks them."""
