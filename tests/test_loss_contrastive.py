"""InfoNCE / CLIP and SigLIP: exact references, finite differences, bf16 and extreme-score stability,
edge cases (batch of 1, padded candidates)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workers.losses.contrastive import (infonce_direction, infonce_loss, infonce_scores, siglip_loss,
                                        siglip_scores, similarity)
from tests.loss_support import unit_embeddings as _emb

pytestmark = [pytest.mark.loss, pytest.mark.usefixtures("one_torch_thread")]


def textbook_infonce(logits: torch.Tensor, pos: torch.Tensor, valid=None) -> float:
    """-s_i+ + log sum_j exp(s_ij), one anchor at a time, in Python floats via math.fsum."""
    total = 0.0
    B, C = logits.shape
    for i in range(B):
        row = [float(logits[i, j]) for j in range(C) if valid is None or bool(valid[j])]
        m = max(row)
        total += -float(logits[i, int(pos[i])]) + m + math.log(math.fsum(math.exp(v - m) for v in row))
    return total / B


def open_clip_form(image, text, scale):
    """The open_clip ClipLoss arithmetic (local batch): mean of the two cross-entropies."""
    logits_per_image = scale * image @ text.T
    logits_per_text = scale * text @ image.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("B,D,scale", [(1, 4, 10.0), (7, 16, 14.3), (32, 8, 100.0)])
def test_infonce_equals_textbook_and_open_clip(B, D, scale):
    image, text = _emb(B, D, 1), _emb(B, D, 2)
    s = torch.tensor([scale], dtype=torch.float64)
    ours = infonce_loss(image, text, s)
    ref = 0.5 * (textbook_infonce(scale * image @ text.T, torch.arange(B))
                 + textbook_infonce(scale * text @ image.T, torch.arange(B)))
    assert abs(float(ours) - ref) < 1e-6
    assert abs(float(ours) - float(open_clip_form(image, text, scale))) < 1e-6
    # float32 embeddings: the same to float tolerance
    ours32 = infonce_loss(image.float(), text.float(), s.float())
    assert ours32.dtype == torch.float32 and abs(float(ours32) - ref) < 1e-4 * max(1.0, abs(ref))


def test_infonce_scores_with_padding_mask_and_offset():
    """Gathered candidates with padded rows: masked columns do not count, the positive sits at offset+i."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 10, generator=g, dtype=torch.float64) * 5
    valid = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    pos = torch.arange(4) + 5
    assert abs(float(infonce_scores(logits, pos, valid)) - textbook_infonce(logits, pos, valid)) < 1e-9
    # open_clip's gathered form: cross-entropy with the labels shifted by the rank offset
    ce = F.cross_entropy(logits.masked_fill(~valid, -math.inf), pos)
    assert abs(float(infonce_scores(logits, pos, valid)) - float(ce)) < 1e-9
    # embedding-level form with offset
    a, c = _emb(3, 6, 4), _emb(8, 6, 5)
    ref = textbook_infonce(2.0 * a @ c.T, torch.arange(3) + 2)
    assert abs(float(infonce_direction(a, c, torch.tensor(2.0, dtype=torch.float64), offset=2)) - ref) < 1e-9


def test_siglip_equals_textbook():
    image, text = _emb(6, 8, 6), _emb(6, 8, 7)
    t, b = 10.0, -3.0
    ours = float(siglip_loss(image, text, torch.tensor([t], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)))
    ref = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            x = z * (t * float(image[i] @ text[j]) + b)
            ref += -(-math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x)))
    assert abs(ours - ref / 6) < 1e-9


def test_finite_difference_gradients():
    """torch.autograd.gradcheck (central differences, float64) of every score-level core and of
    the embedding-level forms, learnable temperature included."""
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    pos = torch.tensor([0, 2, 4, 6, 1])
    valid = torch.tensor([1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: infonce_scores(x, pos, valid), (logits,))
    assert torch.autograd.gradcheck(lambda x: siglip_scores(x, pos, valid), (logits,))
    image = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_()
    text = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_()
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)

    def clip(i, t, s):
        return infonce_loss(F.normalize(i, dim=1), F.normalize(t, dim=1), s)

    def sig(i, t, s, b):
        return siglip_loss(F.normalize(i, dim=1), F.normalize(t, dim=1), s, b)

    assert torch.autograd.gradcheck(clip, (image, text, scale))
    assert torch.autograd.gradcheck(sig, (image, text, scale, bias))


def test_batch_of_one():
    a, b = _emb(1, 4, 9), _emb(1, 4, 10)
    a.requires_grad_()
    loss = infonce_loss(a, b, torch.tensor(20.0, dtype=torch.float64))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(a.grad == 0)          # one candidate: log-softmax of itself
    assert math.isfinite(float(siglip_loss(a, b, torch.tensor(20.0), torch.tensor(-5.0)).detach()))
    empty = torch.zeros(0, 4, requires_grad=True)
    assert float(infonce_scores(empty @ empty.T, torch.zeros(0, dtype=torch.long)).detach()) == 0.0


def test_extreme_scores_are_finite():
    """Scores far outside exp's float32 range (|s| up to 1e4) give exact, finite losses and gradients."""
    logits = torch.tensor([[1e4, -1e4, 9990.0], [0.0, 5e3, -5e3]], dtype=torch.float32, requires_grad=True)
    pos = torch.tensor([0, 2])
    loss = infonce_scores(logits, pos)
    loss.backward()
    # anchor 0: log(1 + e^-2e4 + e^-10) ~ e^-10; anchor 1: 1e4 + log(1 + ...) = 1e4
    assert math.isclose(float(loss.detach()), 0.5 * (math.log1p(math.exp(-10.0)) + 1e4), rel_tol=1e-6)
    assert torch.isfinite(logits.grad).all()
    sig = siglip_scores(logits.detach().requires_grad_(), pos)
    sig.backward()
    assert math.isfinite(float(sig.detach()))


def test_bf16_autocast_scores_stay_float32():
    """Under bf16 autocast the similarities are still computed in float32: the loss equals the float32
    loss of the same (bf16-rounded) embeddings, also at logit scale 100."""
    image, text = _emb(16, 32, 11, torch.float32), _emb(16, 32, 12, torch.float32)
    image_b, text_b = image.bfloat16(), text.bfloat16()
    scale = torch.tensor([100.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = similarity(image_b, text_b, scale)
        loss = infonce_loss(image_b, text_b, scale)
        sig = siglip_loss(image_b, text_b, scale, torch.tensor([-10.0]))
    assert s.dtype == torch.float32 and loss.dtype == torch.float32
    ref = infonce_loss(image_b.float(), text_b.float(), scale)
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref))
    assert math.isfinite(float(sig))
    # what the guard prevents: a bf16 matmul rounds logits of ~50 to +-0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = image_b @ text_b.T
    assert raw.dtype == torch.bfloat16
