"""The losses on a CUDA device: bf16 autocast, extreme scores, the memory on the GPU and its checkpoint.
Skipped on machines without CUDA (CI); run where a GPU is present."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workers.losses.contrastive import infonce_loss, infonce_scores, similarity
from workers.losses.gamma import GammaContrastiveLoss, GammaDirection, GammaSettings
from workers.losses.state import LocalRateStore

pytestmark = [pytest.mark.loss, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _emb(B, D, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g), dim=1).to(device)


def test_bf16_autocast_on_cuda_keeps_float32_scores():
    image, text = _emb(64, 128, 1).bfloat16(), _emb(64, 128, 2).bfloat16()
    scale = torch.tensor([100.0], device="cuda")
    a = GammaContrastiveLoss(64, GammaSettings(mode="sample"), seed=3, distributed=False, device="cuda")
    b = GammaContrastiveLoss(64, GammaSettings(mode="sample"), seed=3, distributed=False, device="cuda")
    ib, tb = image.clone().requires_grad_(), text.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert (image @ text.T).dtype == torch.bfloat16          # what autocast would do
        assert similarity(image, text, scale).dtype == torch.float32
        clip = infonce_loss(ib, tb, scale)
        gam, _ = a(ib, tb, scale, torch.arange(64, device="cuda"))
    (clip + gam).backward()
    ref_clip = infonce_loss(image.float(), text.float(), scale)
    ref_gam, _ = b(image.float(), text.float(), scale, torch.arange(64, device="cuda"))
    assert clip.dtype == torch.float32 and gam.dtype == torch.float32
    assert abs(float(clip.detach()) - float(ref_clip)) < 1e-4 * max(1.0, abs(float(ref_clip)))
    assert abs(float(gam.detach()) - float(ref_gam)) < 1e-4 * max(1.0, abs(float(ref_gam)))
    assert torch.isfinite(ib.grad.float()).all() and torch.isfinite(tb.grad.float()).all()
    torch.testing.assert_close(a.store.tables[0], b.store.tables[0], equal_nan=True)


def test_identity_and_extreme_scores_on_cuda():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(32, 32, generator=g, dtype=torch.float64) * 5).cuda().requires_grad_()
    pos = torch.arange(32, device="cuda")
    d = GammaDirection(LocalRateStore(32, device="cuda"), GammaSettings(gamma=1.0, include_positive=True))
    (g1,) = torch.autograd.grad(d.scores(logits, pos, pos)[0], logits)
    (g2,) = torch.autograd.grad(infonce_scores(logits, pos), logits)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    big = torch.tensor([[1e4, -1e4, 9000.0], [0.0, 5e3, -5e3]], device="cuda", requires_grad=True)
    for est in ("gamma", "sogclr"):
        dd = GammaDirection(LocalRateStore(2, device="cuda"), GammaSettings(estimator=est))
        obj, _ = dd.scores(big, torch.tensor([0, 2], device="cuda"), torch.arange(2, device="cuda"))
        (gb,) = torch.autograd.grad(obj, big)
        assert math.isfinite(float(obj.detach())) and torch.isfinite(gb).all() and torch.isfinite(dd.store.log_rate).all()


def test_cuda_memory_checkpoint_loads_on_cpu():
    loss = GammaContrastiveLoss(1000, GammaSettings(), distributed=False, device="cuda")
    for t in range(3):
        loss(_emb(16, 32, t), _emb(16, 32, 10 + t), torch.tensor([20.0], device="cuda"),
             torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(t)).cuda())
    sd = loss.state_dict()
    assert sd["image_to_text"]["log_rate"].device.type == "cpu"
    cpu = GammaContrastiveLoss(1, GammaSettings(), distributed=False)
    cpu.load_shards([sd])
    for c in range(2):
        torch.testing.assert_close(cpu.store.tables[c], loss.store.tables[c].cpu(), equal_nan=True)
