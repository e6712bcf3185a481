"""Optimiser helpers shared by every training stage: AdamW parameter groups and the LR schedule.

    lr(step) = lr_max * (step + 1) / warmup                             for step < warmup
    lr(step) = lr_min + (lr_max - lr_min) * (1 + cos(pi * p)) / 2       after ("cosine"), p = progress in [0, 1]
    lr(step) = lr_max                                                   after ("constant", the official code's
                                                                        schedule)

with lr_min = lr_max * min_lr_ratio, reaching lr_min at max_steps.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float,
          schedule: str = "cosine") -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, max_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    lo = lr * min_lr_ratio
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; none on norms, biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
