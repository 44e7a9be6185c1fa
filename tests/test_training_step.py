"""The training step every loop calls (workers/training/step.py) and the fast-step settings: each gives
the loss and gradients of the plain step it replaces (bit for bit where the arithmetic is the same,
within float rounding where a kernel changes), and the step reads nothing on the host."""

from __future__ import annotations

import copy

import pytest
import torch

from gammaray.app.benchmarks.step import SyncCounter
from gammaray.config import GammarayConfig, apply_overrides
from gammaray.schema import BatchKeys as K
from workers.models.registry import build_model
from workers.models.two_tower import sdpa_ready_mask
from workers.training.engine import DDPEngine, fast_step_setup, optimizer_and_schedule
from workers.training.objective import OPTIONAL_METRICS, Objective
from workers.training.state import TrainState
from workers.training.step import DeviceLossSums, prepare_batch, train_step

pytestmark = pytest.mark.distributed
TINY = {"data.image_size": 32, "data.max_text_tokens": 8, "data.batch_size": 6, "train.optim.warmup_steps": 0}


def _cfg(**more) -> GammarayConfig:
    return apply_overrides(GammarayConfig(), {**TINY, **more})


def _batch(cfg, step: int, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    B, H, L = cfg.data.batch_size, cfg.data.image_size, cfg.data.max_text_tokens
    mask = torch.ones(B, L, dtype=torch.long)
    if padded:
        mask[::2, L // 2:] = 0
    return {K.SAMPLE_INDEX: torch.arange(B) + step * B, K.PIXELS: torch.randn(B, 3, H, H, generator=g),
            K.INPUT_IDS: torch.randint(5, 500, (B, L), generator=g), K.ATTENTION_MASK: mask}


def _setup(cfg, model=None):
    torch.manual_seed(0)
    model = model or build_model(cfg.model, vocab_size=500, pad_token_id=0)
    objective = Objective(cfg.loss, num_samples=64, seed=0, distributed=False, batch_size=cfg.data.batch_size)
    opt, sched = optimizer_and_schedule(model, cfg, 10)
    return model, objective, opt, sched


@pytest.mark.parametrize("kind", ["gamma", "infonce"])
def test_train_step_is_the_plain_step_bit_for_bit_and_reads_nothing_on_the_host(kind):
    cfg = _cfg(**{"loss.kind": kind, "train.optim.implementation": "for_loop"})
    model, objective, opt, sched = _setup(cfg)
    plain_model = copy.deepcopy(model)
    _, plain_obj, plain_opt, plain_sched = _setup(cfg, plain_model)
    engine = DDPEngine.local(model, opt, sched, cfg, "cpu")
    counter = SyncCounter(cuda=False)
    for step in range(2):
        b = _batch(cfg, step)
        torch.manual_seed(step)  # the same dropout masks
        with counter.active():
            terms = train_step(engine, objective, b, step / 10)
        torch.manual_seed(step)
        out = plain_model(b)
        plain = plain_obj(out, b, step / 10)
        plain_opt.zero_grad(set_to_none=True)
        plain.total.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), cfg.train.gradient_clipping)
        plain_opt.step()
        plain_sched.step()
        assert torch.equal(terms.total, plain.total.detach())
        assert terms.scalars() == plain.scalars()
        for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
            assert torch.equal(p, q), name
    assert counter.count == 0, dict(counter.where)  # no .item()/.tolist()/int()/bool() of a tensor in 2 steps
    assert engine.global_steps == 2


def _grads_after_one_step(cfg, batch, model=None):
    model, objective, opt, sched = _setup(cfg, model)
    engine = DDPEngine.local(model, opt, sched, cfg, "cpu")
    engine.step = lambda: None  # keep the gradients of this micro-batch
    torch.manual_seed(1)
    terms = train_step(engine, objective, batch, 0.0)
    return terms.total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_channels_last_gives_the_same_loss_and_gradients():
    cfg = _cfg()
    b = _batch(cfg, 0)
    base_loss, base = _grads_after_one_step(cfg, b)
    torch.manual_seed(0)
    model = fast_step_setup(build_model(cfg.model, vocab_size=500, pad_token_id=0),
                            apply_overrides(cfg, {"train.channels_last": True}), on_gpu=False)
    conv = next(m for m in model.image_tower.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    loss, grads = _grads_after_one_step(cfg, prepare_batch(b, channels_last=True), model)
    assert prepare_batch(b, channels_last=True)[K.PIXELS].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-6)
    for n, g in base.items():  # float rounding of another conv kernel, relative to each gradient's scale
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-4 * float(g.abs().max()) + 1e-8, msg=n)


def test_uint8_pixels_normalised_on_the_device_are_the_hosts_bit_for_bit():
    """The training stream hands uint8 [B,H,W,3] pixels over (StreamSpec.device_pixels) and
    prepare_batch normalises them: the same floats as the host's normaliser, in either memory
    format and in bf16, and the whole train step gives the same loss and gradients."""
    import numpy as np

    from pipelines.preprocess import normalise

    cfg = _cfg()
    b = _batch(cfg, 0)
    H = b[K.PIXELS].shape[-1]
    u8 = np.random.default_rng(3).integers(0, 256, (b[K.PIXELS].shape[0], H, H, 3), dtype=np.uint8)
    host = torch.from_numpy(normalise(u8))
    for channels_last in (False, True):
        got = prepare_batch({K.PIXELS: torch.from_numpy(u8)}, channels_last=channels_last)[K.PIXELS]
        assert got.dtype == torch.float32 and got.shape == host.shape and torch.equal(got, host)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        bf = prepare_batch({K.PIXELS: torch.from_numpy(u8)}, bf16=True, channels_last=channels_last)[K.PIXELS]
        assert torch.equal(bf, host.to(torch.bfloat16))
    base_loss, base = _grads_after_one_step(cfg, prepare_batch({**b, K.PIXELS: host}))
    loss, grads = _grads_after_one_step(cfg, prepare_batch({**b, K.PIXELS: torch.from_numpy(u8)}))
    assert torch.equal(loss, base_loss)
    for n, g in base.items():
        assert torch.equal(grads[n], g), n


def test_foreach_adamw_updates_like_the_per_tensor_loop():
    b = _batch(_cfg(), 0)
    params = {}
    for impl in ("for_loop", "foreach"):
        cfg = _cfg(**{"train.optim.implementation": impl})
        model, objective, opt, sched = _setup(cfg)
        assert opt.defaults["foreach"] is (impl == "foreach")
        engine = DDPEngine.local(model, opt, sched, cfg, "cpu")
        for step in range(2):
            torch.manual_seed(step)
            train_step(engine, objective, _batch(cfg, step), step / 10)
        params[impl] = dict(model.named_parameters())
    for n, p in params["for_loop"].items():
        torch.testing.assert_close(params["foreach"][n], p, rtol=1e-5, atol=1e-7, msg=n)
    del b


def test_the_ready_attention_mask_gives_the_same_text_embeddings():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=500, pad_token_id=0).eval()
    for padded in (True, False):
        b = _batch(cfg, 1, padded)
        ready = model.text_tower(input_ids=b[K.INPUT_IDS],
                                 attention_mask=sdpa_ready_mask(model.text_tower, b[K.ATTENTION_MASK]))
        plain = model.text_tower(input_ids=b[K.INPUT_IDS], attention_mask=b[K.ATTENTION_MASK])
        torch.testing.assert_close(ready.last_hidden_state, plain.last_hidden_state, rtol=1e-5, atol=1e-6)


def test_device_loss_sums_are_the_host_sums():
    """The loop's epoch loss sums, kept on the device, are the numbers the host sum gives."""
    cfg = _cfg()
    model, objective, opt, sched = _setup(cfg)
    engine = DDPEngine.local(model, opt, sched, cfg, "cpu")
    state = TrainState(loss_sums={"records": 5, "sums": {"loss": 1.25, "old_term": 2.0}})
    host = {"records": 5, "sums": dict(state.loss_sums["sums"])}
    sums = DeviceLossSums()
    for step, n in enumerate((6, 4)):
        terms = train_step(engine, objective, _batch(cfg, step), step / 10)
        sums.add(terms, n, state)
        for k, v in terms.scalars().items():
            if k != "logit_scale":
                host["sums"][k] = host["sums"].get(k, 0.0) + float(v) * n
        host["records"] += n
    sums.flush(state)
    assert state.loss_sums["records"] == host["records"]
    got = state.loss_sums["sums"]
    assert {k: got[k] for k in host["sums"]} == host["sums"]  # bit for bit
    # a diagnostic without a value on these steps (every entry a first visit) sums to 0
    assert all(k in OPTIONAL_METRICS and v == 0.0 for k, v in got.items() if k not in host["sums"]), got


def test_a_ddp_worker_never_imports_deepspeed():
    """The DDP path builds its engine without DeepSpeed: the worker's set-up must not import it (about
    6 s of CPU per worker)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from gammaray.config import GammarayConfig, apply_overrides\n"
            "from workers.models.registry import build_model\n"
            "from workers.runtime import quiet_libraries\n"
            "from workers.training.engine import build_engine\n"
            "import workers.training.loop\n"
            "import torch.distributed as dist\n"
            "quiet_libraries()\n"
            "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
            "cfg = apply_overrides(GammarayConfig(), {'train.strategy': 'ddp'})\n"
            "build_engine(build_model(cfg.model), cfg, total_steps=2, on_gpu=False, in_ray=False)\n"
            "print('deepspeed' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
