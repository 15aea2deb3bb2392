"""AdamW with decoupled weight decay, and the learning-rate schedule as a pure function of the step.

The schedule is not a stateful scheduler object: the LR of optimizer step k is computed from k and written into
the optimizer. Nothing to save or restore on resume, and nothing that Accelerate or DeepSpeed can step
num_processes times per optimizer step.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: biases and LayerNorm weights (all 1-D parameters) get none."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's fused AdamW where it runs (floating-point parameters on CPU or CUDA): the same update as one kernel
    over all parameters instead of a Python loop over every tensor (HF Trainer's default, adamw_torch_fused, is the
    same). On a tiny model the step went from 3.3 to 0.5 ms (docs/benchmarks.md)."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=learning_rate, fused=fused or None)


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    warmup = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total_steps)
    return min(warmup, max(total_steps - 1, 0))  # leave at least the last step for the decay


def lr_at_step(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """LR for optimizer step ``step`` (1-based): rises linearly to ``peak_lr`` at step ``warmup_steps``, then
    falls linearly, reaching 0 one step after ``total_steps``: every step, the last included, changes the weights
    (a decay ending ON the last step made it a no-op, and a 1-step run trained nothing)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * max(total_steps - step + 1, 0) / max(total_steps - warmup_steps, 1)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
