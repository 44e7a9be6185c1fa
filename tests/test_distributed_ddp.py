"""train.strategy=ddp: torch DDP through ray.train.torch.prepare_model behind the same loop. A run
stopped by max_steps inside the epoch on 2 workers is extended on 3 workers: DDP's optimizer state is
replicated, so it comes back whole on any worker count, and every record is still trained once."""

from __future__ import annotations

import pytest

from gammaray.config import GammarayConfig, apply_overrides
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed


@pytest.mark.timeout(900)
def test_ddp_run_stops_at_max_steps_and_extends_on_three_workers(ray_local, small_catalogue, tmp_path):
    from workers.training.trainer import pretrain

    over = tiny_overrides(small_catalogue, str(tmp_path / "runs"), "ddp")
    over.update({"train.strategy": "ddp", "data.val": None, "data.batch_size": 32, "train.workers": 2,
                 "train.max_steps": 3, "train.audit_samples": True, "train.log_every": 1,
                 "train.cpus_per_worker": 0.4})
    first = pretrain(apply_overrides(GammarayConfig(), over), progress=False)
    assert first.metrics["step"] == 3 and first.metrics["samples_seen_total"] == 3 * 32 * 2
    assert "audit_epochs" not in first.metrics  # the epoch is not finished

    over.update({"train.max_steps": None, "train.workers": 3})
    second = pretrain(apply_overrides(GammarayConfig(), over), progress=False)
    m = second.metrics
    assert m["resumed_from_steps"] == [3] and m["resume_optimizer"] == ["exact"]
    assert m["samples_seen_total"] == 384
    assert m["audit_epochs"] == [{"epoch": 0, "once": 384, "repeated": 0, "missed": 0}]
    # 192 records left on 3 workers: 64 each = 2 steps of 32
    assert m["step"] == 5 and m["total_steps"] == 5
