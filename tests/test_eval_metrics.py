"""Evaluation metrics against hand-computed values on small fixed embeddings: ties, duplicates, one
class, NaN, classes missing from a probe's training part."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.evaluation.metrics import (confusion, k_shot_accuracy, k_shot_indices, majority_baseline, modality_gap,
                                        pca_2d, probe_accuracy, recall_at_k, recall_curve, retrieval_metrics,
                                        retrieval_ranks, run_probes, stratified_split, zero_shot_accuracy,
                                        zero_shot_predictions)
from workers.evaluation.evaluate import embedding_outputs, label_columns

pytestmark = pytest.mark.eval

E = torch.eye(3)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# retrieval


def test_ranks_hand_computed():
    # image i vs texts: img0=e1 finds txt0=e1 first; img1=e2 scores 0 with its text e3 while txt2=e2
    # scores 1 and txt0 ties at 0 -> rank 2; img2=e3 likewise rank 2
    image, text = E, t([[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert retrieval_ranks(image, text).tolist() == [0, 2, 2]
    m = retrieval_metrics(image, text)
    assert m["r_at_1_i2t"] == pytest.approx(1 / 3)
    assert m["r_at_5_i2t"] == 1.0 and m["r_at_10_i2t"] == 1.0
    assert retrieval_ranks(text, image).tolist() == [0, 2, 2]
    assert m["chance_r_at_1"] == pytest.approx(1 / 3)


def test_all_tied_scores_rank_last_not_first():
    # a collapsed model: every pair scores the same -> every positive is beaten by N-1 ties
    same = torch.ones(4, 2) / math.sqrt(2)
    assert retrieval_ranks(same, same).tolist() == [3, 3, 3, 3]
    assert recall_at_k(retrieval_ranks(same, same), (1, 3, 4, 5)) == {1: 0.0, 3: 0.0, 4: 1.0, 5: 1.0}


def test_duplicates_count_against_each_other():
    a, b = [1.0, 0.0], [0.0, 1.0]
    image = text = t([a, a, b])
    assert retrieval_ranks(image, text).tolist() == [1, 1, 0]
    assert retrieval_metrics(image, text)["r_at_1_i2t"] == pytest.approx(1 / 3)
    assert retrieval_metrics(image, text)["r_at_5_t2i"] == 1.0


def test_single_pair_and_nan():
    one = t([[0.6, 0.8]])
    assert retrieval_ranks(one, one).tolist() == [0]
    bad = t([[float("nan"), 0.0], [1.0, 0.0], [0.0, 1.0]])
    good = t([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # NaN is a miss at the worst rank, not rank 0; row 1 ties with row 0 (both e1) -> rank 1
    assert retrieval_ranks(bad, good).tolist() == [2, 1, 0]


def test_chunked_ranks_equal_unchunked():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(37, 5, generator=g), dim=1)
    y = torch.nn.functional.normalize(x + 0.5 * torch.randn(37, 5, generator=g), dim=1)
    full = retrieval_ranks(x, y, chunk=1000)
    assert torch.equal(full, retrieval_ranks(x, y, chunk=4))
    # brute force reference
    sims = x @ y.T
    ref = [(sims[i] >= sims[i, i]).sum().item() - 1 for i in range(37)]
    assert full.tolist() == ref


def test_recall_curve():
    assert recall_curve(torch.tensor([0, 2, 2]), 3).tolist() == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert recall_curve(torch.tensor([5, 0]), 2).tolist() == pytest.approx([0.5, 0.5])


def test_mismatched_rows_are_an_error():
    with pytest.raises(ValueError, match="pair up"):
        retrieval_ranks(E, E[:2])


# --------------------------------------------------------------------------------------------
# zero-shot and the modality gap


def test_zero_shot_hand_computed_with_tie():
    classes = t([[1, 0], [0, 1]])
    images = t([[0.9, 0.1], [0.2, 0.8], [0.7071, 0.7071], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 0])
    pred, hit = zero_shot_predictions(images, classes, labels)
    # row 2 ties both prompts exactly: a miss (ties count against); row 3 is simply wrong
    assert hit.tolist() == [True, True, False, False]
    assert pred.tolist()[:2] == [0, 1] and pred.tolist()[3] == 1
    assert zero_shot_accuracy(images, classes, labels) == 0.5


def test_zero_shot_one_class_is_always_right():
    assert zero_shot_accuracy(t([[1, 0], [0, 1]]), t([[0.3, 0.7]]), torch.tensor([0, 0])) == 1.0
    assert zero_shot_accuracy(t([[1, 0]])[:0], t([[1, 0]]), torch.tensor([], dtype=torch.long)) == 0.0


def test_modality_gap_hand_computed():
    assert modality_gap(t([[1, 0], [0, 1]]), t([[-1, 0], [0, -1]])) == pytest.approx(math.sqrt(2))
    assert modality_gap(E, E) == 0.0


# --------------------------------------------------------------------------------------------
# probes


def _clusters(n_per: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1]}
    x, y = [], []
    for name, c in centres.items():
        x.append(np.asarray(c) + 0.05 * rng.standard_normal((n_per, 3)))
        y += [name] * n_per
    return np.concatenate(x), y


def test_linear_probe_separable_and_one_class():
    x, y = _clusters(6)
    assert probe_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    assert probe_accuracy(x[:5], ["a"] * 5, x[5:8], ["a"] * 3) == 1.0


def test_probe_class_missing_from_training_is_a_miss():
    x, y = _clusters(4)
    tr = [i for i, v in enumerate(y) if v != "c"]
    te = [0, 4, 8]  # one of each: a, b, c (c never seen in training)
    assert probe_accuracy(x[tr], [y[i] for i in tr], x[te], [y[i] for i in te]) == pytest.approx(2 / 3)


def test_probe_is_deterministic():
    x, y = _clusters(5, seed=2)
    y = ["a" if i % 2 else "b" for i in range(len(y))]  # labels unrelated to the clusters
    a = probe_accuracy(x[:9], y[:9], x[9:], y[9:])
    assert a == probe_accuracy(x[:9], y[:9], x[9:], y[9:])
    assert 0.0 <= a <= 1.0


def test_k_shot_draws_k_per_class_and_all_of_small_classes():
    y = ["a"] * 7 + ["b"] * 2 + ["c"]
    idx = k_shot_indices(y, 5, np.random.default_rng(0))
    counts = {c: sum(1 for i in idx if y[i] == c) for c in "abc"}
    assert counts == {"a": 5, "b": 2, "c": 1}
    assert len(set(idx.tolist())) == len(idx)
    x, yy = _clusters(6)
    assert k_shot_accuracy(x[::2], yy[::2], x[1::2], yy[1::2], k=1, trials=3) == 1.0


def test_majority_baseline_and_split():
    assert majority_baseline(["a", "a", "b"], ["a", "b", "b", "b"]) == 0.25
    y = ["a"] * 4 + ["b"] + ["c"] * 3
    tr, te = stratified_split(y, 0.5, seed=1)
    assert sorted(tr.tolist() + te.tolist()) == list(range(8))
    assert [y[i] for i in te].count("a") == 2 and [y[i] for i in te].count("c") == 1
    assert "b" not in [y[i] for i in te]  # a class seen once stays in training
    assert np.array_equal(te, stratified_split(y, 0.5, seed=1)[1])


def test_run_probes_per_embedding_and_label_with_missing_attributes():
    x, y = _clusters(4)
    n = len(y)
    emb = {"image": x, "text": -x}
    cols = {"category": y, "attr:size": [("big" if i % 2 else "small") if i < n - 2 else None for i in range(n)]}
    res = run_probes(emb, cols, emb, cols, k_shots=(1, 2), trials=2, seed=0, l2=1e-4)
    assert {(p.embedding, p.label) for p in res} == {("image", "category"), ("text", "category"),
                                                     ("image", "attr:size"), ("text", "attr:size")}
    size = next(p for p in res if p.label == "attr:size" and p.embedding == "image")
    assert size.n_train == n - 2 and size.classes == 2
    cat = next(p for p in res if p.label == "category" and p.embedding == "image")
    assert cat.linear == 1.0 and set(cat.k_shot) == {1, 2} and cat.chance == pytest.approx(1 / 3)
    assert set(cat.flat()) == {"probe_image_category_linear", "probe_image_category_chance",
                               "probe_image_category_k1", "probe_image_category_k2"}


# --------------------------------------------------------------------------------------------
# report helpers and plumbing


def test_confusion_top_classes_and_other_bucket():
    truth = np.asarray([0, 0, 0, 1, 1, 2, -1])
    pred = np.asarray([0, 1, 0, 1, 2, 2, 0])
    m, names = confusion(truth, pred, ["x", "y", "z"], top=2)
    assert names == ["x", "y", "other"]
    assert m.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_pca_2d_recovers_a_line():
    s = np.linspace(-1, 1, 9)
    x = np.stack([s, 2 * s, np.zeros_like(s)], axis=1) + 3.0
    xy = pca_2d(x)
    assert xy.shape == (9, 2)
    assert np.allclose(xy[:, 1], 0, atol=1e-9)
    assert np.allclose(np.abs(xy[:, 0]), np.abs(s) * math.sqrt(5))


def test_embedding_outputs_keeps_extra_heads_and_skips_aug_and_scalars():
    B = 3
    out = {"image": torch.zeros(B, 4), "text": torch.zeros(B, 4), "image_aug": torch.zeros(B, 4),
           "image_specific": torch.zeros(B, 8), "logit_scale": torch.ones(1), "logit_bias": torch.ones(1)}
    assert set(embedding_outputs(out, B)) == {"image", "text", "image_specific"}


def test_label_columns_align_with_sample_index():
    labels = {5: {"category": "A", "attributes": {"colour": "red"}}, 7: {"category": None, "attributes": {}}}
    cols = label_columns(labels, np.asarray([7, 5, 9]))
    assert cols == {"category": [None, "A", None], "attr:colour": [None, "red", None]}


def test_probe_gradient_matches_finite_differences_and_fit_reaches_the_optimum():
    import torch.nn.functional as F

    from workers.evaluation.metrics import _probe_loss_grad, fit_linear_probe

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 6)), rng.integers(0, 4, 60)
    theta = 0.1 * rng.standard_normal(6 * 4 + 4)
    _, g = _probe_loss_grad(theta, x, y, 4, 1e-2)
    eps = 1e-6
    num = np.asarray([(_probe_loss_grad(theta + eps * e, x, y, 4, 1e-2)[0]
                       - _probe_loss_grad(theta - eps * e, x, y, 4, 1e-2)[0]) / (2 * eps) for e in np.eye(theta.size)])
    assert np.abs(num - g).max() < 1e-7
    W, b = fit_linear_probe(x, y, 4, l2=1e-2)
    ours = _probe_loss_grad(np.concatenate([W.ravel(), b]), x, y, 4, 1e-2)[0]
    # the same objective through torch autograd at our solution, and gradient ~ 0 there
    Wt = torch.tensor(W, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    loss = F.cross_entropy(torch.tensor(x) @ Wt + bt, torch.tensor(y)) + 1e-2 * (Wt * Wt).sum()
    loss.backward()
    assert float(loss.detach()) == pytest.approx(ours, abs=1e-12)
    assert max(Wt.grad.abs().max().item(), bt.grad.abs().max().item()) < 1e-5


def _sync_worker(rank: int, init_method: str, q) -> None:
    import torch.distributed as dist

    from workers.runtime import sync_buffers

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    bn = torch.nn.BatchNorm1d(3)
    bn.train()
    torch.manual_seed(rank)
    bn(torch.randn(8, 3) * (1 + rank) + rank)  # each rank tracks its own batch statistics
    before = (bn.running_mean.tolist(), bn.running_var.tolist())
    sync_buffers(bn)
    # plain lists: tensors would travel as shared-memory handles that vanish with this process
    q.put((rank, before, bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked)))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_sync_buffers_averages_batchnorm_statistics_over_ranks(tmp_path):
    """DeepSpeed leaves BatchNorm statistics rank-local; evaluation must see one model on all ranks."""
    import torch.multiprocessing as mp

    from tests.conftest import file_rendezvous

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_method = file_rendezvous(str(tmp_path), "sync")
    procs = [ctx.Process(target=_sync_worker, args=(r, init_method, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(q.get(timeout=100) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (_, b0, m0, v0, n0), (_, b1, m1, v1, n1) = out
    assert not np.allclose(b0[0], b1[0])
    assert m0 == m1 and v0 == v1 and n0 == n1 == 1
    assert np.allclose(m0, (np.asarray(b0[0]) + b1[0]) / 2) and np.allclose(v0, (np.asarray(b0[1]) + b1[1]) / 2)
