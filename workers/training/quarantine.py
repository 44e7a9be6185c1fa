"""Records rejected while streaming: the quality gate that stops a run on a broken catalogue, the
per-reason counts, and the per-rank quarantine file written with every checkpoint."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.config import GammarayConfig, RunError
from gammaray.schema import QUARANTINE_SCHEMA
from pipelines import storage
from pipelines.storage import Store
from workers.runtime import run_dir
from workers.training.state import TrainState


class DataQualityError(ValueError, RunError):
    """Too many bad records: the run stops instead of training on a broken catalogue."""


def quarantine_by_reason(quarantine: list[dict]) -> dict[str, int]:
    """Distinct records (source, row) per reason: a bad record met in every epoch counts once."""
    seen: dict[str, set] = {}
    for q in quarantine:
        seen.setdefault(q["reason"], set()).add((q["source"], q["row"]))
    return {r: len(v) for r, v in seen.items()}


def check_quality(state: TrainState, cfg: GammarayConfig) -> None:
    seen = state.records_trained + len(state.quarantine)
    bad = len(state.quarantine)
    if seen >= 100 and bad / seen > cfg.data.quarantine_max_fraction:
        reasons: dict[str, int] = {}
        for q in state.quarantine:
            reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        raise DataQualityError(
            f"{bad} of {seen} records ({bad / seen:.1%}) were rejected, above data.quarantine_max_fraction="
            f"{cfg.data.quarantine_max_fraction}: {reasons}. First: {state.quarantine[0]}"
        )


def write_quarantine(state: TrainState, cfg: GammarayConfig, store: Store, rank: int) -> None:
    """Records rejected while streaming, cumulative per rank, rewritten with every checkpoint so the
    file always matches the data position that the checkpoint resumes from."""
    if not state.quarantine:
        return
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(state.quarantine, schema=QUARANTINE_SCHEMA), buf)
    store.write_bytes(storage.join(run_dir(cfg), "quarantine", f"stream-rank{rank:05d}.parquet"), buf.getvalue())
