"""The structure regularizers (workers/losses/structure.py) against direct loop implementations of
docs/design.md section 3, exact zeros where the formulas say so, finite-difference gradients, batch
permutation invariance, and the objective wiring (weights, names, off = no compute, inactive ranks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gammaray.config import GammarayConfig, LossConfig, apply_overrides
from workers.losses import structure as S
from workers.training.objective import Objective

pytestmark = pytest.mark.structure

D = torch.float64


def unit(n: int, d: int, seed: int, dtype=D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b)))


# ---------------------------------------------------------------------------------------------
# direct loop implementations (plain Python floats over rows)


def loop_infonce(anchors, candidates, scale):
    n = anchors.shape[0]
    total = 0.0
    for i in range(n):
        s = [scale * dot(anchors[i], candidates[j]) for j in range(n)]
        total += -s[i] + math.log(sum(math.exp(v) for v in s))
    return total / n


def loop_ortho(zv, ziv, zt, zit):
    n = zv.shape[0]
    return sum(dot(zv[j], ziv[j]) ** 2 + dot(zt[j], zit[j]) ** 2 for j in range(n)) / n


def sqdist(a, b) -> float:
    return sum((float(u) - float(v)) ** 2 for u, v in zip(a, b))


def paper_uniformity(x, t=2.0):
    """The paper's L_uni of one modality: log (1/N^2) sum_{j=1..N} sum_{k=1..N} exp(-t ||x_j - x_k||^2)."""
    n = x.shape[0]
    return math.log(sum(math.exp(-t * sqdist(x[j], x[k])) for j in range(n) for k in range(n)) / n ** 2)


def paper_sep(zv, ziv, zt, zit, ziv_aug, zit_aug, scale):
    """The paper's L_sep = L_ortho + L^i_con + L_uni, with L^i_con = V2V + T2T on the specific features
    (augmented view as positive) and L_uni summed over the two modalities."""
    return (loop_ortho(zv, ziv, zt, zit) + loop_infonce(ziv, ziv_aug, scale) + loop_infonce(zit, zit_aug, scale)
            + paper_uniformity(ziv) + paper_uniformity(zit))


def loop_bridge(zva, zv, zt, ts):
    n = zv.shape[0]
    total = 0.0
    for j in range(n):
        m = [ts[j] * float(a) + (1 - ts[j]) * float(b) for a, b in zip(zv[j], zt[j])]
        norm = math.sqrt(sum(v * v for v in m))
        total += sum((float(a) - v / norm) ** 2 for a, v in zip(zva[j], m))
    return total / n


def loop_gc(zv, zt):
    n = zv.shape[0]
    total = 0.0
    for j in range(n):
        for k in range(n):
            total += (dot(zv[j], zt[k]) - dot(zv[k], zt[j])) ** 2
            total += (dot(zv[j], zv[k]) - dot(zt[j], zt[k])) ** 2
    return total / n


def loop_gc_aug(zv, zt, zva, zta):
    n = zv.shape[0]
    total = 0.0
    for j in range(n):
        for k in range(n):
            total += (dot(zv[j], zv[k]) - dot(zva[j], zva[k])) ** 2
            total += (dot(zt[j], zt[k]) - dot(zta[j], zta[k])) ** 2
    for j in range(n):
        total += (dot(zv[j], zt[j]) - dot(zva[j], zta[j])) ** 2
    return total / n


# ---------------------------------------------------------------------------------------------
# equal to the loops, on random inputs (with a batch of one and duplicated rows among them)


def _cases():
    yield unit(7, 5, 1), unit(7, 5, 2), unit(7, 5, 3), unit(7, 5, 4)
    yield unit(1, 4, 5), unit(1, 4, 6), unit(1, 4, 7), unit(1, 4, 8)
    v, t = unit(5, 6, 9), unit(5, 6, 10)
    v[3], t[3] = v[1], t[1]  # a duplicated record in the batch
    yield v, t, unit(5, 6, 11), unit(5, 6, 12)


@pytest.mark.parametrize("case", list(range(3)))
def test_terms_equal_direct_loops(case):
    zv, zt, zva, zta = list(_cases())[case]
    scale = torch.tensor([7.5], dtype=D)
    assert abs(float(S.in_modal_infonce(zv, zva, scale)) - loop_infonce(zv, zva, 7.5)) < 1e-6
    assert abs(float(S.orthogonality_loss(zv, zva, zt, zta)) - loop_ortho(zv, zva, zt, zta)) < 1e-6
    assert abs(float(S.uniformity_loss(zva)) - paper_uniformity(zva)) < 1e-6
    ts = torch.rand(zv.shape[0], generator=torch.Generator().manual_seed(case), dtype=D)
    assert abs(float(S.brownian_bridge_loss(zva, zv, zt, ts)) - loop_bridge(zva, zv, zt, ts.tolist())) < 1e-6
    assert abs(float(S.brownian_bridge_loss(zva, zv, zt, 0.25))
               - loop_bridge(zva, zv, zt, [0.25] * zv.shape[0])) < 1e-6
    assert abs(float(S.geometric_consistency_loss(zv, zt)) - loop_gc(zv, zt)) < 1e-6
    assert abs(float(S.geometric_consistency_aug_loss(zv, zt, zva, zta)) - loop_gc_aug(zv, zt, zva, zta)) < 1e-6


def test_terms_equal_loops_in_float32_too():
    zv, zt, zva, zta = (x.float() for x in next(_cases()))
    scale = torch.tensor([20.0])
    assert abs(float(S.in_modal_infonce(zv, zva, scale)) - loop_infonce(zv, zva, 20.0)) < 1e-5
    assert abs(float(S.geometric_consistency_loss(zv, zt)) - loop_gc(zv, zt)) < 1e-6
    assert abs(float(S.uniformity_loss(zva)) - paper_uniformity(zva)) < 1e-6


def test_uniformity_with_an_unnormalised_input_matches_the_loop():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=D) * 0.3
    assert abs(float(S.uniformity_loss(x)) - paper_uniformity(x)) < 1e-6


def distinct_pairs_uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """The form this project had before issue 14 (Wang & Isola's estimator): log mean over j != k."""
    n = x.shape[0]
    e = torch.exp(-t * torch.cdist(x, x).pow(2))
    return torch.log((e.sum() - e.diagonal().sum()) / (n * (n - 1)))


@pytest.mark.parametrize("n", [4, 8, 32])
def test_the_earlier_uniformity_gradient_is_the_papers_times_n_plus_s_over_s(n):
    """paper = log((N + S) / N^2), distinct pairs = log(S / (N (N - 1))) with S the off-diagonal sum:
    the same direction, the earlier one's gradient scaled by (N + S) / S (large when S << N: small
    batches, spread features): why the paper's form matters at this project's micro-batches."""
    x = unit(n, 16, n).requires_grad_(True)
    (g_paper,) = torch.autograd.grad(S.uniformity_loss(x), x)
    (g_pairs,) = torch.autograd.grad(distinct_pairs_uniformity(x), x)
    with torch.no_grad():
        s_off = float(torch.exp(-2 * torch.cdist(x, x).pow(2)).sum() - n)
    assert torch.allclose(g_pairs, g_paper * (n + s_off) / s_off, rtol=1e-6, atol=1e-10)
    assert (n + s_off) / s_off > 1.5  # unit vectors in 16-d: S is small against N at these batch sizes


# ---------------------------------------------------------------------------------------------
# exact zeros


def test_gc_is_exactly_zero_for_identical_modality_embeddings():
    for seed, n in ((0, 9), (1, 1), (2, 33)):
        z = unit(n, 16, seed)
        assert float(S.geometric_consistency_loss(z, z.clone())) == 0.0
        assert float(S.geometric_consistency_aug_loss(z, z.clone(), z.clone(), z.clone())) == 0.0
        z32 = z.float()
        assert float(S.geometric_consistency_loss(z32, z32.clone())) == 0.0
    # and not zero otherwise
    assert float(S.geometric_consistency_loss(unit(9, 16, 0), unit(9, 16, 1))) > 1e-3


def test_bridge_is_exactly_zero_at_the_bridge_point():
    zv, zt = unit(8, 6, 0), unit(8, 6, 1)
    for t in (0.25, torch.rand(8, generator=torch.Generator().manual_seed(0), dtype=D)):
        mu = S.bridge_points(zv, zt, t)
        assert float(S.brownian_bridge_loss(mu, zv, zt, t)) == 0.0
        assert float(S.brownian_bridge_loss(zv, zv, zt, t)) > 1e-3
    # t = 1 puts the bridge point on the image itself, t = 0 on the text
    assert float(S.brownian_bridge_loss(zv, zv, zt, 1.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(S.brownian_bridge_loss(zt, zv, zt, 0.0)) == pytest.approx(0.0, abs=1e-12)


def test_ortho_is_exactly_zero_for_orthogonal_features():
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(6, 8, dtype=D)
    zi = torch.zeros(6, 8, dtype=D)
    z[:, :4] = torch.randn(6, 4, generator=g, dtype=D)
    zi[:, 4:] = torch.randn(6, 4, generator=g, dtype=D)
    z, zi = F.normalize(z, dim=-1), F.normalize(zi, dim=-1)
    assert float(S.orthogonality_loss(z, zi, z.flip(0), zi.flip(0))) == 0.0
    # rotated orthogonal pairs: zero up to rounding
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=D))
    assert float(S.orthogonality_loss(z @ q, zi @ q, z @ q, zi @ q)) < 1e-28
    assert float(S.orthogonality_loss(z, z, z, z)) == pytest.approx(2.0)


def test_uniformity_of_a_single_row_is_zero_and_of_identical_rows_is_its_maximum():
    assert float(S.uniformity_loss(unit(1, 4, 0))) == 0.0
    same = unit(1, 4, 0).expand(5, 4).clone()
    assert float(S.uniformity_loss(same)) == 0.0  # log mean exp(0)
    assert float(S.uniformity_loss(unit(64, 4, 1))) < -1.0
    # the paper's diagonal terms bound it below by log(1/N): spread rows cannot push it further
    x = unit(8, 64, 2)
    assert float(S.uniformity_loss(x)) > math.log(1 / 8) > float(distinct_pairs_uniformity(x))


# ---------------------------------------------------------------------------------------------
# finite-difference gradients (float64)


def _fd_inputs(n=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=D, requires_grad=True) for _ in range(4)]


def test_gradients_match_finite_differences():
    zv, zt, zva, zta = _fd_inputs()
    scale = torch.tensor([3.0], dtype=D, requires_grad=True)
    t = torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=D)
    checks = [
        (lambda a, b, s: S.in_modal_infonce(a, b, s), (zv, zva, scale)),
        (S.orthogonality_loss, (zv, zva, zt, zta)),
        (lambda a: S.uniformity_loss(a), (zva,)),
        (lambda a, b, c: S.brownian_bridge_loss(a, b, c, t), (zva, zv, zt)),
        (lambda a, b, c: S.brownian_bridge_loss(a, b, c, 0.25), (zva, zv, zt)),
        (S.geometric_consistency_loss, (zv, zt)),
        (S.geometric_consistency_aug_loss, (zv, zt, zva, zta)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5), fn


# ---------------------------------------------------------------------------------------------
# invariance to permuting the batch


def test_every_term_is_invariant_to_permuting_the_batch():
    zv, zt, zva, zta = unit(11, 7, 0), unit(11, 7, 1), unit(11, 7, 2), unit(11, 7, 3)
    t = torch.rand(11, generator=torch.Generator().manual_seed(0), dtype=D)
    scale = torch.tensor([9.0], dtype=D)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5))

    def all_terms(v, tt, va, ta, ts):
        return torch.stack([
            S.in_modal_infonce(v, va, scale), S.in_modal_infonce(tt, ta, scale),
            S.orthogonality_loss(v, va, tt, ta), S.uniformity_loss(va),
            S.brownian_bridge_loss(va, v, tt, ts), S.geometric_consistency_loss(v, tt),
            S.geometric_consistency_aug_loss(v, tt, va, ta),
        ])

    a = all_terms(zv, zt, zva, zta, t)
    b = all_terms(zv[perm], zt[perm], zva[perm], zta[perm], t[perm])
    assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max()


# ---------------------------------------------------------------------------------------------
# bf16 inputs (the GPU path) stay finite and near the float32 values


def test_terms_are_finite_and_close_in_bfloat16():
    zv, zt, zva, zta = (x.float() for x in (unit(32, 64, 0), unit(32, 64, 1), unit(32, 64, 2), unit(32, 64, 3)))
    scale = torch.tensor([100.0])
    for fn, args in [(S.in_modal_infonce, (zv, zva, scale)), (S.uniformity_loss, (zva,)),
                     (S.geometric_consistency_loss, (zv, zt)),
                     (lambda a, b, c: S.brownian_bridge_loss(a, b, c, 0.25), (zva, zv, zt))]:
        full = float(fn(*args))
        half = fn(*[a.bfloat16() for a in args])
        assert torch.isfinite(half).all()
        assert abs(float(half) - full) <= 0.05 * abs(full) + 0.05


# ---------------------------------------------------------------------------------------------
# bridge t


def test_bridge_t_fixed_or_sampled_in_range():
    t = S.sample_bridge_t(5, 0.25, None, "cpu")
    assert torch.equal(t, torch.full((5,), 0.25))
    g = torch.Generator().manual_seed(0)
    t = S.sample_bridge_t(10_000, 0.25, (0.1, 0.4), "cpu", generator=g)
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.4
    assert float(t.std()) > 0.05  # really per sample


def test_bridge_t_range_is_validated():
    from gammaray.config import ConfigError

    with pytest.raises(ConfigError, match="bridge_t_range"):
        apply_overrides(GammarayConfig(), {"loss.structure.bridge_t_range": [0.6, 0.2]})


# ---------------------------------------------------------------------------------------------
# the objective: names, weights, L_con, off = nothing computed, inactive ranks


def _outputs(n=6, d=8, seed=0, specific=True, requires_grad=False):
    keys = ["image", "text", "image_aug", "text_aug"]
    if specific:
        keys += ["image_specific", "text_specific", "image_specific_aug", "text_specific_aug"]
    out = {k: unit(n, d, seed + i, torch.float32).requires_grad_(requires_grad) for i, k in enumerate(keys)}
    out["logit_scale"] = torch.tensor([10.0])
    out["logit_bias"] = torch.tensor([-10.0])
    return out


def _objective(**structure) -> Objective:
    cfg = apply_overrides(GammarayConfig(), {"loss.kind": "infonce",
                                             **{f"loss.structure.{k}": v for k, v in structure.items()}})
    return Objective(cfg.loss, num_samples=100, distributed=False)


def test_all_weights_zero_means_no_structure_terms_and_no_augmented_views():
    obj = _objective()
    assert not obj.needs_augmented_views
    out = _outputs(specific=False)
    for k in ("image_aug", "text_aug"):
        del out[k]
    terms = obj(out, {}, active=True)
    assert set(terms.terms) == {"contrastive_loss"}
    assert not any(k.startswith("structure/") for k in terms.metrics)


@pytest.mark.parametrize("knob", ["in_modal", "lambda_sep", "lambda_br", "lambda_gc"])
def test_each_knob_alone_asks_for_augmented_views(knob):
    obj = _objective(**{knob: True if knob == "in_modal" else 0.5})
    assert obj.needs_augmented_views


def test_weighted_terms_are_named_and_in_modal_base_is_lcon():
    from workers.losses.contrastive import infonce_direction

    obj = _objective(in_modal=True, lambda_sep=0.5, lambda_br=2.0, lambda_gc=3.0)
    out = _outputs()
    lt = obj(out, {}, active=True)
    assert set(lt.terms) == {"contrastive_loss", "in_modal_loss", "sep_loss", "bridge_loss", "gc_loss"}
    s = out["logit_scale"]
    v2t = infonce_direction(out["image"], out["text"], s)
    t2v = infonce_direction(out["text"], out["image"], s)
    v2v = infonce_direction(out["image"], out["image_aug"], s)
    t2t = infonce_direction(out["text"], out["text_aug"], s)
    l_con = 0.25 * (v2t + t2v + v2v + t2t)
    assert float(lt.terms["contrastive_loss"] + lt.terms["in_modal_loss"]) == pytest.approx(float(l_con), abs=1e-6)
    sep_args = [out[k].double() for k in ("image", "image_specific", "text", "text_specific", "image_specific_aug",
                                          "text_specific_aug")]
    sep = paper_sep(*sep_args, 10.0)
    assert float(lt.terms["sep_loss"]) == pytest.approx(0.5 * sep, abs=1e-5)
    br = S.brownian_bridge_loss(out["image_aug"], out["image"], out["text"], 0.25)
    assert float(lt.terms["bridge_loss"]) == pytest.approx(2.0 * float(br), abs=1e-6)
    gc = S.geometric_consistency_loss(out["image"], out["text"]) + S.geometric_consistency_aug_loss(
        out["image"], out["text"], out["image_aug"], out["text_aug"])
    assert float(lt.terms["gc_loss"]) == pytest.approx(3.0 * float(gc), abs=1e-6)
    # unweighted values are reported by name for logging and Ray Tune
    scalars = lt.scalars()
    for k in ("sep_loss", "bridge_loss", "gc_loss", "in_modal_loss", "structure/ortho", "structure/uniformity",
              "structure/specific_con", "structure/bridge", "structure/gc_base", "structure/gc_aug",
              "structure/v2v", "structure/t2t"):
        assert k in scalars, k
    assert scalars["structure/bridge"] == pytest.approx(float(br), abs=1e-6)


def test_sep_parts_are_reported_unweighted_in_the_papers_form():
    out = _outputs()
    args = [out[k].double() for k in ("image", "image_specific", "text", "text_specific", "image_specific_aug",
                                      "text_specific_aug")]
    lt = _objective(lambda_sep=2.0)(out, {}, active=True)
    assert float(lt.terms["sep_loss"]) == pytest.approx(2.0 * paper_sep(*args, 10.0), abs=1e-5)
    assert lt.metrics["structure/uniformity"] == pytest.approx(paper_uniformity(args[1]) + paper_uniformity(args[3]),
                                                               abs=1e-5)
    assert lt.metrics["structure/specific_con"] == pytest.approx(
        loop_infonce(args[1], args[4], 10.0) + loop_infonce(args[3], args[5], 10.0), abs=1e-5)


@pytest.mark.parametrize("structure, on", [
    ({}, False), ({"lambda_sep": 0.1}, True), ({"lambda_br": 0.1}, True), ({"lambda_gc": 0.1}, True),
    ({"in_modal": False, "lambda_gc": 0.1}, False), ({"in_modal": True}, True),
])
def test_in_modal_auto_puts_a_regularized_run_on_the_papers_base(structure, on):
    """in_modal defaults to auto: L_con = 1/4 (V2T + T2V + V2V + T2T) exactly when a regularizer is on
    (the base the paper's results assume); a plain run stays cross-modal only, with no augmented views."""
    assert GammarayConfig().loss.structure.in_modal == "auto"
    obj = _objective(**structure)
    assert obj.structure.s.in_modal is on
    lt = obj(_outputs(), {}, active=True)
    assert ("in_modal_loss" in lt.terms) is on
    assert obj.needs_augmented_views is (on or bool(structure))


def test_in_modal_auto_is_allowed_for_other_view_pairs_when_no_regularizer_is_on():
    from gammaray.config import ConfigError

    ok = apply_overrides(GammarayConfig(), {"data.view_pair": "text_text", "data.pair_locale": "de_DE"})
    assert not ok.loss.structure.in_modal_active()
    with pytest.raises(ConfigError, match="view_pair=image_text"):
        apply_overrides(ok, {"loss.structure.in_modal": True})
    with pytest.raises(ConfigError, match="view_pair=image_text"):
        apply_overrides(ok, {"loss.structure.lambda_br": 0.5})


def test_sampled_bridge_t_uses_the_configured_range():
    obj = _objective(lambda_br=1.0, bridge_t_range=[0.9, 0.9])
    out = _outputs(specific=False)
    lt = obj(out, {}, active=True)
    want = S.brownian_bridge_loss(out["image_aug"], out["image"], out["text"], 0.9)
    assert float(lt.terms["bridge_loss"]) == pytest.approx(float(want), abs=1e-6)


def test_inactive_rank_returns_exact_zeros_under_the_same_names():
    obj = _objective(in_modal=True, lambda_sep=0.5, lambda_br=2.0, lambda_gc=3.0)
    active = obj(_outputs(), {}, active=True)
    out = _outputs(seed=5, requires_grad=True)
    idle = obj(out, {}, active=False)
    assert set(idle.terms) == set(active.terms)
    for name, v in idle.terms.items():
        assert float(v.detach()) == 0.0, name
    idle.total.backward()  # differentiable, so the rank takes the same backward
    assert out["image"].grad is not None and float(out["image"].grad.abs().sum()) == 0.0


def test_missing_outputs_are_named():
    obj = _objective(lambda_sep=1.0)
    out = _outputs(specific=False)
    with pytest.raises(KeyError, match="image_specific"):
        obj(out, {}, active=True)
    obj = _objective(lambda_br=1.0)
    out = _outputs(specific=False)
    del out["image_aug"]
    with pytest.raises(KeyError, match="image_aug"):
        obj(out, {}, active=True)


def test_structure_terms_add_to_the_gamma_contrastive_loss_too():
    cfg = apply_overrides(GammarayConfig(), {"loss.kind": "gamma", "loss.structure.in_modal": True,
                                             "loss.structure.lambda_gc": 1.0})
    obj = Objective(cfg.loss, num_samples=10, distributed=False)
    out = _outputs(specific=False)
    lt = obj(out, {"sample_index": torch.arange(6)}, active=True)
    assert {"contrastive_loss", "in_modal_loss", "gc_loss"} == set(lt.terms)
    assert math.isfinite(float(lt.total))


def test_lambda_sep_with_specific_heads_switched_off_is_a_config_error():
    from gammaray.config import ConfigError

    with pytest.raises(ConfigError, match="specific_heads"):
        apply_overrides(GammarayConfig(), {"loss.structure.lambda_sep": 1.0, "model.specific_heads": False})
    cfg = apply_overrides(GammarayConfig(), {"loss.structure.lambda_sep": 1.0})
    assert cfg.model.has_specific_heads()
    assert not GammarayConfig().model.has_specific_heads()
    # the resolution follows later overrides (Ray Tune patches the lambdas one by one)
    assert not apply_overrides(cfg, {"loss.structure.lambda_sep": 0.0}).model.has_specific_heads()
    assert isinstance(cfg.loss, LossConfig)
