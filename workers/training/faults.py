"""Fault injection for the failure-handling tests: the GAMMARAY_FAULT hook that kills a worker or the
driver (or pauses) at a chosen optimizer step, once; a JSON list sets several faults in one run."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass


FAULT_ENV = "GAMMARAY_FAULT"


@dataclass
class Fault:
    """Test hook for failure handling, set by the driver's environment (GAMMARAY_FAULT, JSON):
    at optimizer step `step`, rank `rank` SIGKILLs itself ("worker") or the driver process ("driver"),
    or only writes the marker and waits ("pause": a test acts at that step, e.g. stops the storage
    server), once: a marker file guards it so the restarted run does not repeat it. `delay_s` first
    lets the Ray Train controller register the checkpoint reported just before (it polls every 2 s)."""

    target: str
    step: int
    marker: str
    rank: int = 0
    delay_s: float = 0.0
    driver_pid: int | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "list[Fault]":
        """The faults of a GAMMARAY_FAULT value: one JSON object or a list of them."""
        if not spec:
            return []
        loaded = json.loads(spec)
        faults = []
        for d in loaded if isinstance(loaded, list) else [loaded]:
            if d.get("target") not in ("worker", "driver", "pause") or "step" not in d or "marker" not in d:
                raise ValueError(f"{FAULT_ENV}: need target=worker|driver|pause, step and marker; got {d}")
            faults.append(cls(**d))
        return faults

    def maybe_fire(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.step or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            json.dump({"step": step, "rank": rank, "pid": os.getpid(), "time": time.time()}, f)
        time.sleep(self.delay_s)
        if self.target == "pause":
            return
        if self.target == "worker":
            os.kill(os.getpid(), signal.SIGKILL)
        assert self.driver_pid is not None
        os.kill(self.driver_pid, signal.SIGKILL)
        time.sleep(3600)  # hold the others at the next collective until Ray reaps the orphaned job


def fault_from_env() -> str | None:
    """The GAMMARAY_FAULT test hook, with this (driver) process's id filled in for target=driver."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    faults = Fault.parse(spec)
    for fault in faults:
        if fault.target == "driver" and fault.driver_pid is None:
            fault.driver_pid = os.getpid()
    return json.dumps([f.__dict__ for f in faults])
