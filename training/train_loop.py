"""The training loop: accumulate -> clip -> step (lr schedule, EMA) -> log -> validate/checkpoint.

Everything the loop needs is built by `training.train`; this module only runs
steps. Steps are numbered from 1, as in checkpoint names; step k's randomness comes
from a generator seeded by (seed, k - 1, micro-batch, rank), so the loss trajectory of
a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class LoopParts:
    """What is trained and how: built once by train.py."""

    accelerator: object
    loss_fn: Callable[[dict, torch.Generator], tuple[torch.Tensor, dict]]
    models: list[torch.nn.Module]  # the prepared (possibly DDP-wrapped) trainable modules
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    batches: Iterator[dict]  # micro-batches, starting at this run's first step
    ema: object | None = None
    validate: Callable[[int], dict] | None = None  # step -> metrics
    checkpoint: Callable[[int], None] | None = None  # step -> None (all ranks)
    log: Callable[[dict, int], None] = lambda metrics, step: None


@dataclass(frozen=True)
class LoopSchedule:
    start_step: int
    max_train_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    logging_steps: int = 10
    checkpointing_steps: int | None = None
    validation_steps: int | None = None


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator for one micro-batch, a pure function of where it is in training."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]))


def _no_sync(parts: LoopParts, last_micro: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if last_micro:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for model in parts.models:
        stack.enter_context(parts.accelerator.no_sync(model))
    return stack


def accumulate(parts: LoopParts, schedule: LoopSchedule, index: int) -> tuple[float, dict]:
    """Forward/backward over the micro-batches of step `index + 1` (0-based `index` seeds the noise);
    returns the mean loss."""
    n = schedule.gradient_accumulation_steps
    total, logs = 0.0, {}
    for micro in range(n):
        batch = next(parts.batches)
        generator = step_generator(schedule.seed, index, micro, parts.accelerator.process_index)
        with _no_sync(parts, micro == n - 1), parts.accelerator.autocast():
            loss, logs = parts.loss_fn(batch, generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite loss {loss.item()} at step {index + 1}; lower --learning_rate or check the data.")
        parts.accelerator.backward(loss / n)
        total += loss.item() / n
    return total, logs


def optimizer_step(parts: LoopParts, max_grad_norm: float | None) -> float:
    """Clip, step, schedule, zero; returns the gradient norm before clipping."""
    grad_norm = parts.accelerator.clip_grad_norm_(parts.params, max_grad_norm if max_grad_norm else math.inf)
    parts.optimizer.step()
    parts.lr_scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.step(parts.params)
    return float(grad_norm)


def mean_across_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="mean").item()


def train_loop(parts: LoopParts, schedule: LoopSchedule) -> list[tuple[int, float]]:
    """Run steps start_step+1 .. max_train_steps (1-based step numbers, as in checkpoint names)."""
    accelerator = parts.accelerator
    bar = tqdm(
        range(schedule.start_step, schedule.max_train_steps), initial=schedule.start_step,
        total=schedule.max_train_steps, disable=not accelerator.is_local_main_process, desc="train",
    )
    for model in parts.models:
        model.train()
    history = []
    for index in bar:
        step = index + 1
        t0 = time.perf_counter()
        # 1. forward/backward over the micro-batches, 2. clip and step (lr schedule, EMA)
        loss, extra = accumulate(parts, schedule, index)
        grad_norm = optimizer_step(parts, schedule.max_grad_norm)
        loss = mean_across_processes(accelerator, loss)
        history.append((step, loss))
        # 3. log
        metrics = {"train/loss": loss, "train/lr": parts.lr_scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                   "train/step_seconds": time.perf_counter() - t0, **{f"train/{k}": v for k, v in extra.items()}}
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['train/lr']:.2e}", gn=f"{grad_norm:.2f}")
        if step % schedule.logging_steps == 0 or step == schedule.max_train_steps:
            parts.log(metrics, step)
        # 4. validate and checkpoint
        if parts.validate and schedule.validation_steps and step % schedule.validation_steps == 0:
            parts.log(parts.validate(step), step)
            for model in parts.models:
                model.train()
        if parts.checkpoint and schedule.checkpointing_steps and step % schedule.checkpointing_steps == 0:
            parts.checkpoint(step)
    bar.close()
    return history
