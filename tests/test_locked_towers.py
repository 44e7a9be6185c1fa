"""Locked towers (LiT / open_clip --lock-*): frozen weights, eval-mode BatchNorm, the last N blocks
unlocked, the cached-feature path equal to the live path, and a temperature cap the temperature can
come back from."""

from __future__ import annotations

import math

import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from gammaray.schema import BatchKeys as K
from workers.models.registry import build_model
from workers.models.two_tower import clamp_above, tower_blocks
from workers.training.objective import Objective

pytestmark = pytest.mark.loss

TINY = {
    "model.embed_dim": 16,
    "model.image.hf_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                              "layer_type": "basic"},
    "model.text.hf_config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 32, "max_position_embeddings": 32, "vocab_size": 50},
    "data.image_size": 32,
}


def tiny_cfg(**over) -> GammarayConfig:
    return apply_overrides(GammarayConfig(), {**TINY, **over})


def batch(B: int = 6, L: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, L // 2 + 1:] = torch.randint(0, 2, (B, L - L // 2 - 1), generator=g)
    return {K.PIXELS: torch.randn(B, 3, 32, 32, generator=g), K.INPUT_IDS: torch.randint(1, 50, (B, L), generator=g),
            K.ATTENTION_MASK: mask, K.SAMPLE_INDEX: torch.arange(B)}


def test_locked_towers_get_no_gradient_and_keep_batchnorm_statistics():
    cfg = tiny_cfg(**{"model.image.locked": True, "model.text.locked": True, "model.text.unlocked_layers": 1})
    torch.manual_seed(0)
    model = build_model(cfg.model)  # as built, without a train() call: the training loop makes none
    image_before = {k: v.clone() for k, v in model.image_tower.state_dict().items()}
    # image tower: nothing trains, BatchNorm stays in eval mode (its running statistics never move)
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert not any(m.training for m in model.image_tower.modules())
    # text tower: embeddings and layer 0 frozen, layer 1 and the pooler trainable, in train mode
    blocks = tower_blocks(model.text_tower)
    assert blocks is model.text_tower.encoder.layer
    assert not any(p.requires_grad for p in model.text_tower.embeddings.parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    assert all(p.requires_grad for p in model.text_tower.pooler.parameters())
    assert blocks[1].training and not blocks[0].training and not model.text_tower.embeddings.training

    out = model(batch())
    loss = Objective(cfg.loss, num_samples=6, distributed=False)(out, batch()).total
    loss.backward()
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert all(p.grad is None for p in blocks[0].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
    for k, v in model.image_tower.state_dict().items():   # BatchNorm buffers included
        assert torch.equal(v, image_before[k]), k
    # the optimizer only sees trainable parameters
    from workers.training.engine import param_groups

    trainable = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert not any(id(p) in trainable for p in model.image_tower.parameters())
    assert all(id(p) in trainable for p in blocks[1].parameters())


def test_unlocking_more_blocks_than_the_tower_has_names_the_key():
    with pytest.raises(ValueError, match=r"model.text.unlocked_layers=3.*2 blocks"):
        build_model(tiny_cfg(**{"model.text.locked": True, "model.text.unlocked_layers": 3}).model)


@pytest.mark.parametrize("loss", ["infonce", "gamma", "sogclr", "siglip"])
def test_cached_features_give_the_live_path_loss_and_head_gradients(loss):
    cfg = tiny_cfg(**{"model.image.locked": True, "model.text.locked": True, "loss.kind": loss})
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    b = batch()
    live_out = model(b)
    live = Objective(cfg.loss, num_samples=6, distributed=False, seed=1)(live_out, b).total
    live_grad = torch.autograd.grad(live, [model.image_proj.weight, model.text_proj.weight, model.log_logit_scale])
    with torch.no_grad():
        feats = {K.IMAGE_FEATURES: model.image_features(b[K.PIXELS])[0],
                 K.TEXT_FEATURES: model.text_features(b[K.INPUT_IDS], b[K.ATTENTION_MASK])[0],
                 K.SAMPLE_INDEX: b[K.SAMPLE_INDEX]}
    cached = Objective(cfg.loss, num_samples=6, distributed=False, seed=1)(model(feats), feats).total
    cached_grad = torch.autograd.grad(cached, [model.image_proj.weight, model.text_proj.weight, model.log_logit_scale])
    assert float(cached.detach()) == float(live.detach())
    for a, c in zip(live_grad, cached_grad):
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    # a heads-only model (no towers built) gives the same loss from the same features
    from workers.models.two_tower import TwoTowerModel

    heads = TwoTowerModel(cfg.model, feature_widths=(feats[K.IMAGE_FEATURES].shape[1], feats[K.TEXT_FEATURES].shape[1]))
    heads.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("image_tower.", "text_tower."))})
    assert heads.image_tower is None
    again = Objective(cfg.loss, num_samples=6, distributed=False, seed=1)(heads(feats), feats).total
    assert float(again.detach()) == float(live.detach())


def test_logit_scale_cap_lets_the_temperature_come_back():
    """Past the cap the scale reads as the cap; a loss that wants a smaller scale still moves the
    parameter down (exp(p).clamp(max) would zero that gradient for good), one that wants a larger
    scale gets no push."""
    cap = math.log(100.0)
    p = torch.tensor([cap + 0.5], requires_grad=True)
    scale = clamp_above(p, cap).exp()
    assert float(scale.detach()) == pytest.approx(100.0)
    (g_down,) = torch.autograd.grad(scale.sum(), p)       # minimising the scale: descent lowers p
    assert float(g_down) > 0
    scale = clamp_above(p, cap).exp()
    (g_up,) = torch.autograd.grad(-scale.sum(), p)        # a loss that wants the scale larger
    assert float(g_up) == 0.0
    below = torch.tensor([cap - 0.5], requires_grad=True)
    (g,) = torch.autograd.grad((clamp_above(below, cap).exp() * -1).sum(), below)
    assert float(g) == pytest.approx(-math.exp(cap - 0.5))  # below the cap: the plain gradient
    # through the model, with SGD, a scale pushed past the cap comes back below it
    cfg = tiny_cfg(**{"model.max_logit_scale": 20.0, "model.temperature": 0.01})  # init 1/tau = 100 > 20
    model = build_model(cfg.model)
    opt = torch.optim.SGD([model.log_logit_scale], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model.logit_scale().sum().backward()                # a loss that wants a smaller scale
        opt.step()
    assert float(model.log_logit_scale.detach()) < math.log(100.0)


def test_cached_features_config_is_refused_for_towers_that_train():
    from gammaray.config import ConfigError

    with pytest.raises(ConfigError, match="model.image.locked and model.text.locked"):
        tiny_cfg(**{"data.features.train": "/x", "model.image.locked": True})
    with pytest.raises(ConfigError, match="augmented views"):
        tiny_cfg(**{"data.features.train": "/x", "model.image.locked": True, "model.text.locked": True,
                    "loss.structure.lambda_br": 1.0})
    with pytest.raises(ConfigError, match="augmented views"):
        tiny_cfg(**{"data.features.train": "/x", "model.image.locked": True, "model.text.locked": True,
                    "loss.structure.in_modal": True})
    # in_modal=auto (the default) is off without a regularizer weight: cached features are fine
    cfg = tiny_cfg(**{"data.features.train": "/x", "model.image.locked": True, "model.text.locked": True,
                      "loss.structure.in_modal": "auto"})
    assert cfg.loss.structure.in_modal == "auto" and not cfg.loss.structure.in_modal_active()


def test_random_towers_config_has_the_pretrained_towers_shape():
    """configs/random-towers.yaml (GPU timings at a realistic size) builds the architectures of
    configs/pretrained-towers.yaml: EfficientNet-Lite0 without its classifier (4.65 M - 1.28 M
    parameters) and all-MiniLM-L6-v2's BERT (22.7 M)."""
    import os

    from gammaray.config import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load(os.path.join(root, "configs", "random-towers.yaml"))
    model = build_model(cfg.model, vocab_size=30522, pad_token_id=0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert type(model.image_tower).__name__ == "EfficientNetLiteModel"
    assert count(model.image_tower) == 4_652_008 - (1280 * 1000 + 1000)
    assert count(model.text_tower) == 22_713_216
    assert (cfg.data.image_size, cfg.model.text.pooling) == (224, "mean")
