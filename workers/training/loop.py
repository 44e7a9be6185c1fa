"""The per-worker training loop, run by Ray Train on every worker (or in this process with
train.workers=0): DeepSpeed or DDP engine + objective + resumable data stream.

The loop reads like the single-process one; the distributed parts are marked:
  [ray]  ray.train.get_context / get_checkpoint / report
  [ds]   engine forward / backward / step / save / load (DeepSpeed, or DDP behind the same calls)
  [dist] every rank takes the same number of steps (agreed once per epoch); the step itself makes
         no host read (workers/training/step.py), metrics are read every train.log_every steps
  [data] the next epoch's pipeline started early

Steps are optimizer steps. With gradient accumulation a step is `train.gradient_accumulation_steps`
micro-batches per worker; an accumulation group never spans two epochs (the last one of an epoch may be
shorter), and reports, evaluations and checkpoints happen only on step boundaries, so a checkpoint never
holds half-accumulated gradients and resume is exact.

What the loop calls lives beside it: checkpoint.py (save and restore a mapping of components, each with
`state_dict`/`load_state_dict`: the engine, the objective, the train state with the data position in
state.py, the sample audit, the random streams in rng.py), metrics.py (what it reports), quarantine.py,
faults.py; the plumbing shared with evaluation is workers/runtime.py (rank, device, folders) and
workers/batches.py (tensors, the lockstep walk); the stream is pipelines/stream.py
(StreamSpec.from_config); `pretrain` (trainer.py) starts it.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import ray.train
import torch

from gammaray.config import from_dict
from gammaray.schema import BatchKeys as K
from pipelines.prepare import load_manifest
from pipelines.stream import StreamSpec, close_prefetched, epoch_part, iterate, prefetch, total_rows, units_from_manifest
from pipelines.tokenizer import load as load_tokenizer, tokenizer_uri
from workers.evaluation.evaluate import evaluate  # validation: the same code as `gammaray eval`
from workers.models.registry import build_model
from workers.batches import batches_left, Lockstep, placeholder_batch
from workers.runtime import pick_device, quiet_libraries, world
from workers.training.audit import SampleAudit
from workers.training.checkpoint import CheckpointManager, latest_checkpoint
from workers.training.engine import EngineState, build_engine, init_single_process_group, setting_on, use_bf16
from workers.training.faults import Fault
from workers.training.metrics import (epoch_loss_means, new_window, prefixed, run_record, run_totals,
                                      step_metrics, val_r_at_1)
from workers.training.objective import LossTerms, Objective
from workers.training.quarantine import check_quality
from workers.training.resume import run_identity
from workers.training.rng import ProcessRNG
from workers.training.state import TrainState, estimate_total_steps, plan_of
from workers.training.step import DeviceLossSums, prepare_batch, scalars, train_step


def for_epoch(spec: StreamSpec, epoch: int) -> StreamSpec:
    """The same stream with the augmentation and permutation seeds of another epoch."""
    return dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess, epoch=epoch))


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    in_ray = loop_config.get("in_ray", True)
    faults = Fault.parse(loop_config.get("fault"))
    identity = loop_config.get("identity")
    quiet_libraries()
    if not in_ray:
        init_single_process_group()
    rank, W = world()
    on_gpu, device = pick_device(cfg, in_ray)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    random.seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)

    store = loop_config["store"]  # the run's storage, bound in this process as it was unpickled
    manifest = load_manifest(cfg.data.train, store)
    units = units_from_manifest(manifest)
    num_samples = int(manifest["next_sample_index"])
    identity = identity or run_identity(cfg, manifest)
    tokenizer = load_tokenizer(tokenizer_uri(cfg), store)
    model = build_model(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    objective = Objective(cfg.loss, num_samples=num_samples, seed=cfg.run.seed, device=device, distributed=W > 1,
                          view_pair=cfg.data.view_pair, batch_size=cfg.data.batch_size)
    with_aug = objective.needs_augmented_views
    spec = StreamSpec.from_config(cfg, cfg.data.train, units, epoch=0, train=True, with_aug=with_aug,
                                  batch_size=cfg.data.batch_size, device_pixels=True)
    ckpt = latest_checkpoint(cfg, store, in_ray)  # [ray]
    if ckpt is None and cfg.data.prefetch_next_epoch:
        # [data] a fresh run: start epoch 0's pipeline now, so that its worker processes start while
        # the engine is built (a resumed run starts from its checkpointed position instead)
        prefetch(spec, epoch_part(units, 0, cfg.run.seed, W, rank, cfg.data.shuffle))
    total_steps = estimate_total_steps(cfg, int(manifest["num_records"]), W)
    engine, _, scheduler = build_engine(model, cfg, total_steps, on_gpu, device, in_ray)   # [ds]
    bf16 = use_bf16(cfg, on_gpu)
    audit = SampleAudit(num_samples) if cfg.train.audit_samples else None

    state = TrainState(total_steps=total_steps, plan=plan_of(cfg), identity=identity, num_records=total_rows(units))
    checkpoints = CheckpointManager({"engine": EngineState(engine, scheduler, cfg), "objective": objective,
                                     "train_state": state, "audit": audit, "rng": ProcessRNG()}, cfg, store, in_ray)
    if ckpt is not None:
        checkpoints.restore(ckpt)  # on any worker count; only the files this rank reads

    gas = cfg.train.gradient_accumulation_steps
    report_every, ckpt_every, max_steps = cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.max_steps
    window = new_window()   # since the last report
    attempt = new_window()  # since this process started (the final line's throughput)
    last: LossTerms | None = None  # the last active micro-batch's terms, on the device until a report reads them
    loss_sums = DeviceLossSums()
    pin = on_gpu and setting_on(cfg.train.pin_memory, on_gpu)
    channels_last = setting_on(cfg.train.channels_last, on_gpu)
    micro = 0  # micro-batches accumulated towards the next optimizer step
    done = max_steps is not None and state.step >= max_steps
    while not done and state.epoch < cfg.train.epochs:
        epoch = state.epoch
        if state.part is None:
            state.part, state.consumed, state.epoch_consumed_before = epoch_part(
                units, epoch, cfg.run.seed, W, rank, cfg.data.shuffle), 0, 0
        then = None
        if cfg.data.prefetch_next_epoch and epoch + 1 < cfg.train.epochs:
            # [data] the next epoch's pipeline starts once this one has produced its last block
            then = (for_epoch(spec, epoch + 1), epoch_part(units, epoch + 1, cfg.run.seed, W, rank, cfg.data.shuffle))
        epoch_finished = True  # no rank has data left (an empty part, or a resume at the epoch's end)
        batches = iterate(for_epoch(spec, epoch), state.part, then=then)
        if W > 1 and state.lockstep_left is None:  # [dist] once per epoch: how many batches every rank takes
            state.lockstep_left = batches_left(sum(seg.size for seg in state.part) - state.consumed,
                                               cfg.data.batch_size, device)
        walk = Lockstep(batches, device, state.lockstep_left, window, pin=pin)
        for sb, tensors, n_global, last_batch in walk:                              # [dist]
            epoch_finished = last_batch
            active = tensors is not None
            batch = prepare_batch(tensors if active else placeholder_batch(cfg, with_aug, device), bf16, channels_last)
            boundary = micro + 1 == gas or last_batch
            n_local = sb.size if active else 0
            # weight so the average over ranks is the mean over all good rows of the step (a device
            # tensor when distributed: the global row count is never read on the host)
            weight = None if W == 1 else n_local * W / n_global.clamp_min(1).double()
            last_terms = train_step(engine, objective, batch, state.step / max(1, state.total_steps),  # [ds]
                                    weight=weight, active=active, boundary=boundary, touch=W > 1)
            micro = 0 if boundary else micro + 1
            if sb is not None:
                state.consumed = sb.consumed
                state.records_trained += sb.size
                state.quarantine.extend(sb.rejected)
                check_quality(state, cfg)
                if audit is not None and active:
                    audit.add(sb.arrays[K.SAMPLE_INDEX])
            for w in (window, attempt):
                w["records"] += n_local
                w["micro"] += 1
            if active:
                last = last_terms
                loss_sums.add(last_terms, n_local, state)
            if not boundary:
                continue
            state.step = engine.global_steps
            window["steps"] += 1
            attempt["steps"] += 1
            done = (max_steps is not None and state.step >= max_steps) or (last_batch and epoch == cfg.train.epochs - 1)
            if state.step % report_every == 0 or state.step % ckpt_every == 0 or done:
                checkpoint_now = state.step % ckpt_every == 0 and not done  # the end saves anyway
                metrics = step_metrics(state, scalars(last), window, scheduler, epoch)
                val_now = bool(cfg.data.val) and cfg.train.eval_every is not None and (
                    state.step % cfg.train.eval_every == 0 or checkpoint_now)
                if val_now:
                    state.last_val = evaluate(engine, cfg, store, tokenizer, device)
                    state.best_val_r_at_1 = max(state.best_val_r_at_1, val_r_at_1(state.last_val))
                metrics.update(prefixed(state.last_val, cfg))
                if checkpoint_now:
                    loss_sums.flush(state)
                    state.lockstep_left = walk.left
                    checkpoints.save(metrics)                                       # [ray]
                elif in_ray:
                    ray.train.report(metrics)                                      # [ray]
                attempt["wait"] += window["wait"]
                window.update(new_window())  # in place: lockstep holds it as its clock
            for fault in faults:
                fault.maybe_fire(rank, state.step)
            if done:
                break
        state.lockstep_left = walk.left if W > 1 else None
        if not epoch_finished:
            break  # stopped by max_steps inside the epoch: the position stays for a later extension
        # the epoch is finished
        loss_sums.flush(state)
        state.lockstep_left = None
        if audit is not None:
            state.audit.append(audit.close_epoch(epoch, device))
        state.epoch, state.part, state.consumed, state.epoch_consumed_before = epoch + 1, None, 0, 0
        state.loss_sums_prev, state.loss_sums = state.loss_sums, {}

    close_prefetched()
    loss_sums.flush(state)
    # final evaluation, totals over all ranks, and the last checkpoint
    attempt["wait"] += window["wait"]
    metrics = step_metrics(state, scalars(last), attempt, scheduler, min(state.epoch, cfg.train.epochs - 1))
    if cfg.data.val:
        state.last_val = evaluate(engine, cfg, store, tokenizer, device)
        state.best_val_r_at_1 = max(state.best_val_r_at_1, val_r_at_1(state.last_val))
    metrics.update(prefixed(state.last_val, cfg))
    # the run's figures, the same on every rank: counts summed over ranks, loss terms averaged over
    # the last epoch's records (one micro-batch may hold a single record or be a rank's stand-in)
    metrics.update(run_totals(state, attempt, W, device))
    metrics.update(epoch_loss_means(state, W, device))
    metrics.update(run_record(state, objective.nbytes(), manifest))
    checkpoints.save(metrics, final=True)

