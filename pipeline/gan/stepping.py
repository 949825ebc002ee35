"""What every method's optimisation step shares: its precisions, optimisers, pools, settings and result."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.gan.image_pool import ImagePool

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Optimisers:
    """Adam for the generators (CUT: G and F), Adam for the discriminators, and fp16's GradScaler (disabled
    otherwise)."""

    g: torch.optim.Optimizer
    d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


@dataclass
class Pools:
    """This rank's histories of fake_a (for D_a) and fake_b (for D_b)."""

    a: ImagePool
    b: ImagePool


@dataclass
class StepSettings:
    """How the step runs: device and precision (fp16 scales both losses with one GradScaler), whether the ranks
    agree on finite losses before updating (check_finite) and on stopping (distributed), the memory format, and
    whether compiled networks replay CUDA graphs (each step then tells torch that a new iteration begins)."""

    device: torch.device
    precision: str = "fp32"
    check_finite: bool = True
    distributed: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    cudagraphs: bool = False


@dataclass
class StepResult:
    """Detached loss terms of one step, whether its update was applied, and whether training stops after it."""

    losses: dict[str, Tensor]
    applied: bool = True
    stop: bool = False


def update_scale(scaler: torch.amp.GradScaler) -> bool:
    """Advance fp16's loss scale after a step; True when it was lowered, i.e. the step was skipped on an inf/NaN
    gradient. A no-op returning False when the scaler is disabled (fp32, bf16)."""
    if not scaler.is_enabled():
        return False
    # update() lowers the scale exactly when a gradient was inf/NaN and the step was skipped. Reading the scale
    # (public API, no private attributes) is two small host reads per step, in fp16 only.
    before = scaler.get_scale()
    scaler.update()
    return scaler.get_scale() < before
