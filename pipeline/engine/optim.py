"""Adam for both generator and discriminator pairs, and the learning-rate schedule as a function of steps.

The schedule is a pure function of the step, so resuming restores it exactly from the step counter alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def build_adam(params: Iterable[nn.Parameter], lr: float, beta1: float, beta2: float,
               device: torch.device | None = None) -> torch.optim.Adam:
    """Adam as in the paper. On CUDA the fused kernel (a few launches for all parameters, and GradScaler's
    inf check without a host read); elsewhere `foreach`, which batches the per-parameter updates into few
    kernels and keeps CPU results as they were."""
    if device is not None and device.type == "cuda":
        return torch.optim.Adam(list(params), lr=lr, betas=(beta1, beta2), fused=True)
    return torch.optim.Adam(list(params), lr=lr, betas=(beta1, beta2), foreach=True)


def lr_factor(step: int, total_steps: int, decay_start_frac: float = 0.5) -> float:
    """Multiplier of the base lr for the 0-indexed `step`: 1, then linear towards 0 at `total_steps`.

    The reference's `linear` policy, 1 - max(0, k + epoch_count - n_epochs) / (n_epochs_decay + 1) for the
    0-indexed epoch k and epoch_count = 1, counted in optimiser steps because streams have no epochs.
    """
    constant = int(round(total_steps * decay_start_frac))
    decay = total_steps - constant
    return 1.0 - max(0, step + 1 - constant) / float(decay + 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


LR_SCALING = ("none", "linear", "sqrt")


def scaled_lr(lr: float, global_batch: int, rule: str = "none", reference_batch: int = 1) -> float:
    """The base learning rate for `global_batch` images per domain and step: `lr` as given (none), or scaled by
    the global batch over `reference_batch`, the batch `lr` was tuned at (linear: Goyal et al. 2017 for SGD;
    sqrt: the rule usually argued for Adam)."""
    ratio = global_batch / reference_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
