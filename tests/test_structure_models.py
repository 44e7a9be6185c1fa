"""Model side of the structure work: modality-specific heads on the two-tower model, the ALBEF-style
fusion model (forward/backward, ITM hard negatives, momentum encoders), export with specific heads."""

from __future__ import annotations

import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from gammaray.schema import BatchKeys as K
from workers.models.fusion import FusionModel, sample_hard_negatives
from workers.models.two_tower import TwoTowerModel
from workers.models.registry import build_model, load_model, save_model
from workers.training.objective import Objective

pytestmark = pytest.mark.structure

TINY = {
    "model.embed_dim": 16,
    "model.image.hf_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                              "depths": [1, 1], "layer_type": "basic"},
    "model.text.hf_config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32},
    "data.image_size": 32, "data.max_text_tokens": 12,
}


def cfg_for(kind: str, **extra):
    return apply_overrides(GammarayConfig(), {**TINY, "model.kind": kind, "loss.kind": "infonce", **extra})


def batch(n: int = 6, aug: bool = True, seed: int = 0, index=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[:, 8:] = 0
    ids[:, 8:] = 0
    b = {K.SAMPLE_INDEX: torch.arange(n) if index is None else torch.as_tensor(index),
         K.PIXELS: torch.randn(n, 3, 32, 32, generator=g), K.INPUT_IDS: ids, K.ATTENTION_MASK: mask}
    if aug:
        b.update({K.PIXELS_AUG: torch.randn(n, 3, 32, 32, generator=g), K.INPUT_IDS_AUG: ids.clone(),
                  K.ATTENTION_MASK_AUG: mask.clone()})
    return b


ALL = {"loss.structure.in_modal": True, "loss.structure.lambda_sep": 1.0, "loss.structure.lambda_br": 1.0,
       "loss.structure.lambda_gc": 1.0}


# ---------------------------------------------------------------------------------------------
# two-tower: specific heads


def test_two_tower_has_specific_heads_only_when_separation_is_on():
    plain = build_model(cfg_for("two_tower").model, vocab_size=100, pad_token_id=0)
    assert not hasattr(plain, "image_specific_proj")
    out = plain(batch(aug=False))
    assert set(out) == {"image", "text", "logit_scale", "logit_bias"}

    cfg = cfg_for("two_tower", **{"loss.structure.lambda_sep": 1.0, "model.specific_dim": 8})
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0)
    out = m(batch())
    for k in ("image_specific", "text_specific", "image_specific_aug", "text_specific_aug"):
        assert out[k].shape == (6, 8)
        assert torch.allclose(out[k].norm(dim=-1), torch.ones(6), atol=1e-5)
    assert out["image"].shape == (6, 16)


def test_export_keeps_specific_heads_beside_the_shared_ones(tmp_path):
    cfg = cfg_for("two_tower", **{"loss.structure.lambda_sep": 1.0})
    torch.manual_seed(0)
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0).eval()
    save_model(m, str(tmp_path), cfg.model)
    heads = torch.load(tmp_path / "heads.pt")
    assert {"image_specific_proj.weight", "text_specific_proj.weight", "image_proj.weight"} <= set(heads)
    back = load_model(str(tmp_path)).eval()  # without the loss config: the json says the heads exist
    b = batch(aug=False)
    with torch.no_grad():
        a, c = m(b), back(b)
    for k in ("image", "text", "image_specific", "text_specific"):
        assert torch.allclose(a[k], c[k], atol=1e-6), k


# ---------------------------------------------------------------------------------------------
# fusion model


def test_fusion_forward_backward_reaches_every_trainable_parameter():
    cfg = cfg_for("fusion", **ALL)
    torch.manual_seed(0)
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0)
    assert isinstance(m, FusionModel)
    m.train()
    obj = Objective(cfg.loss, num_samples=10, distributed=False)
    b = batch()
    out = m(b)
    for k in ("image", "text", "image_aug", "text_aug", "image_specific", "text_specific", "image_specific_aug",
              "text_specific_aug", "itm_loss", "itm_accuracy"):
        assert k in out, k
    # the momentum encoders' outputs are the augmented features: no gradient
    assert not out["image_aug"].requires_grad and not out["text_specific_aug"].requires_grad
    lt = obj(out, b)
    assert {"contrastive_loss", "in_modal_loss", "sep_loss", "bridge_loss", "gc_loss", "itm_loss"} == set(lt.terms)
    assert torch.isfinite(lt.total)
    lt.total.backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None)]
    # logit_bias is SigLIP's only (the training loop's zero-weight touch reaches it); BERT's pooler is
    # unused by mean pooling, as in the two-tower model: the same set on every rank
    assert no_grad == ["logit_bias", "text_tower.pooler.dense.weight", "text_tower.pooler.dense.bias"], no_grad
    for n, p in m.named_parameters():
        if n.startswith("momentum."):
            assert not p.requires_grad and p.grad is None
    assert float(m.fusion.layers[0].cross_attention.self.query.weight.grad.abs().sum()) > 0
    assert float(m.itm_head.weight.grad.abs().sum()) > 0
    assert 0.0 <= float(out["itm_accuracy"]) <= 1.0


def test_fusion_itm_loss_matches_a_direct_recomputation():
    cfg = cfg_for("fusion")
    torch.manual_seed(1)
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0)
    m.eval()  # no dropout, no EMA: deterministic, but compute ITM explicitly
    b = batch(n=5, aug=False)
    with torch.no_grad():
        out = m(b)
        assert "itm_loss" not in out  # evaluation does not pay for ITM
        img_h, img_raw = m.image_features(b[K.PIXELS])
        txt_h, txt_raw = m.text_features(b[K.INPUT_IDS], b[K.ATTENTION_MASK])
        from workers.models.two_tower import tower_tokens

        torch.manual_seed(7)
        itm = m.itm(tower_tokens(img_raw), tower_tokens(txt_raw), b[K.ATTENTION_MASK], out["image"], out["text"],
                    out["logit_scale"], b[K.SAMPLE_INDEX])
        neg_text, neg_image = itm["itm_negatives"]
        logits = []
        pairs = [(i, i, 1) for i in range(5)] + [(i, int(neg_text[i]), 0) for i in range(5)] \
            + [(int(neg_image[j]), j, 0) for j in range(5)]
        for i, j, _ in pairs:
            fused = m.fusion(tower_tokens(txt_raw)[j:j + 1], b[K.ATTENTION_MASK][j:j + 1], tower_tokens(img_raw)[i:i + 1])
            logits.append(m.itm_head(fused[:, 0]))
        want = torch.nn.functional.cross_entropy(torch.cat(logits), torch.tensor([p[2] for p in pairs]))
    assert float(itm["itm_loss"]) == pytest.approx(float(want), abs=1e-5)
    assert all(int(neg_text[i]) != i and int(neg_image[i]) != i for i in range(5))


def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 12, (1,), generator=g))
        sim = torch.randn(n, n, generator=g) * float(torch.rand(1, generator=g) * 50)
        if trial % 3 == 0:  # an overwhelming positive: the negatives' softmax mass would underflow
            sim = sim + torch.eye(n) * 1e4
        index = torch.randint(0, max(1, n // 2 + 1), (n,), generator=g) if trial % 2 else torch.arange(n)
        same = index.view(-1, 1) == index.view(1, -1)
        picked, valid = sample_hard_negatives(sim, same, generator=g)
        for i in range(n):
            if valid[i]:
                assert not same[i, picked[i]], (trial, i)
                assert int(index[picked[i]]) != int(index[i])
            else:
                assert bool(same[i].all()) and int(picked[i]) == -1
    # a batch of one has no negative
    picked, valid = sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert not valid.any()


def test_hard_negatives_follow_the_similarities():
    sim = torch.tensor([[0.0, 5.0, 0.0, -5.0]] * 4)
    same = torch.eye(4, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(200):
        picked, _ = sample_hard_negatives(sim, same, generator=g)
        counts[picked[0]] += 1
    assert counts[0] == 0
    assert counts[1] > 150 and counts[3] < 5  # softmax weights over the negatives: the hardest dominates


def test_fusion_itm_with_duplicates_and_a_batch_of_one():
    cfg = cfg_for("fusion")
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0).train()
    out = m(batch(n=1, aug=False))
    assert torch.isfinite(out["itm_loss"])  # positives only
    out = m(batch(n=4, aug=False, index=[3, 3, 3, 3]))  # all the same record: no negative at all
    assert torch.isfinite(out["itm_loss"])
    m(batch(n=6, aug=False, index=[0, 1, 0, 2, 1, 3]))
    neg_text, neg_image = m.last_itm_negatives
    idx = torch.tensor([0, 1, 0, 2, 1, 3])
    assert (idx[neg_text] != idx).all() and (idx[neg_image] != idx).all()


def test_momentum_encoders_are_an_ema_of_the_online_encoders():
    cfg = cfg_for("fusion", **{"model.fusion.momentum": 0.9, "loss.structure.lambda_br": 1.0})
    torch.manual_seed(0)
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0).train()
    online = m.image_proj.weight
    mom = m.momentum["image_proj"].weight
    assert torch.equal(online, mom)  # starts as a copy
    with torch.no_grad():
        online.add_(1.0)  # as if an optimizer step moved the online weights
    before_m, before_o = mom.detach().clone(), online.detach().clone()
    m(batch())
    assert torch.allclose(mom, 0.9 * before_m + 0.1 * before_o, atol=1e-6)
    # evaluation does not move the momentum encoders
    m.eval()
    frozen = mom.detach().clone()
    with torch.no_grad():
        m(batch())
    assert torch.equal(mom, frozen)
    # the augmented features come from the momentum encoders
    m.reset_momentum()
    b = batch()
    with torch.no_grad():
        out = m(b)
        assert torch.allclose(out["image_aug"], m.encode_image(b[K.PIXELS_AUG]), atol=1e-5)


def test_fusion_text_only_and_image_only_batches_for_evaluation():
    m = build_model(cfg_for("fusion").model, vocab_size=100, pad_token_id=0).eval()
    b = batch(aug=False)
    with torch.no_grad():
        t = m({K.INPUT_IDS: b[K.INPUT_IDS], K.ATTENTION_MASK: b[K.ATTENTION_MASK]})
        i = m({K.PIXELS: b[K.PIXELS]})
    assert t["text"].shape == (6, 16) and "image" not in t
    assert i["image"].shape == (6, 16) and "itm_loss" not in i


def test_fusion_export_leaves_out_the_momentum_encoders(tmp_path):
    cfg = cfg_for("fusion", **{"loss.structure.lambda_sep": 1.0})
    torch.manual_seed(0)
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0).eval()
    save_model(m, str(tmp_path), cfg.model)
    heads = torch.load(tmp_path / "heads.pt")
    assert not any(k.startswith("momentum.") for k in heads)
    assert any(k.startswith("fusion.layers.0.cross_attention") for k in heads) and "itm_head.weight" in heads
    back = load_model(str(tmp_path)).eval()
    assert isinstance(back, FusionModel) and back.specific
    assert torch.equal(back.momentum["image_proj"].weight, back.image_proj.weight)
    b = batch(aug=False)
    with torch.no_grad():
        a, c = m(b), back(b)
    assert torch.allclose(a["image"], c["image"], atol=1e-6) and torch.allclose(a["text"], c["text"], atol=1e-6)


def test_fusion_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="heads"):
        build_model(cfg_for("fusion", **{"model.fusion.heads": 3}).model, vocab_size=100, pad_token_id=0)


def test_two_tower_behaviour_is_unchanged_without_structure():
    cfg = cfg_for("two_tower")
    torch.manual_seed(0)
    m = build_model(cfg.model, vocab_size=100, pad_token_id=0)
    assert type(m) is TwoTowerModel
    b = batch(aug=True)
    out = m(b)
    assert torch.allclose(out["image_aug"], m.encode_image(b[K.PIXELS_AUG]), atol=1e-6)


@pytest.mark.timeout(300)
def test_fusion_trains_under_zero3_and_the_ema_runs_on_the_partitions():
    """ZeRO-3 (a world of one, in this process): parameters are partitioned placeholders outside
    forward, so the EMA must update the local partitions (`ds_tensor`)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from workers.training.engine import build_engine, init_single_process_group

    init_single_process_group()
    cfg = cfg_for("fusion", **{"train.deepspeed.zero_stage": 3, "loss.structure.lambda_br": 1.0,
                               "loss.structure.lambda_sep": 1.0, "model.fusion.momentum": 0.5,
                               "train.optim.warmup_steps": 0, "train.optim.lr": 1e-2})
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=100, pad_token_id=0)
    obj = Objective(cfg.loss, num_samples=10, distributed=False)
    engine, _, _ = build_engine(model, cfg, total_steps=10, on_gpu=False)
    online, mom = engine.module.image_proj.weight, engine.module.momentum["image_proj"].weight
    assert online.numel() == 0 and online.ds_tensor.numel() > 0  # really partitioned
    for _ in range(2):
        before_m, before_o = mom.ds_tensor.clone(), online.ds_tensor.clone()
        b = batch(6)
        out = engine(b)
        lt = obj(out, b)
        assert {"sep_loss", "bridge_loss", "itm_loss"} <= set(lt.terms) and torch.isfinite(lt.total)
        engine.backward(lt.total + sum(v.sum() for v in out.values()) * 0.0)
        engine.step()
        assert torch.allclose(mom.ds_tensor, 0.5 * before_m + 0.5 * before_o, atol=1e-6)
        assert not torch.equal(online.ds_tensor, before_o)  # the optimizer moved the online encoder
