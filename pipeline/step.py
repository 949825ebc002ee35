"""One CycleGAN optimisation step: the G phase, then the D phase, then the optimiser updates.

The order of SPEC.md is kept where it matters: the D phase trains on the fakes of the G phase's forward pass
(made before G's update), and D's parameters are the same before and after G's update. So both backward passes
can run before either optimiser steps, which lets one small collective per step decide, identically on every
rank, whether the update is applied (all losses finite) and whether training stops after it (a signal).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.cyclegan import Discriminators, Objective
from pipeline.dist import all_reduce_max
from pipeline.image_pool import ImagePool

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(flag)


@dataclass
class StepResult:
    """Detached loss terms of one step and whether its update was applied."""

    losses: dict[str, Tensor]
    applied: bool = True
    stop: bool = False
    fakes: dict[str, Tensor] = field(default_factory=dict)


class TrainStep:
    """Runs the step on this rank. `gens`/`discs` may be DDP wrappers of `gens_module`/`discs_module`.

    Args:
        gens, discs: what the forward passes are called through (DDP wrappers, or the modules themselves).
        discs_module: the unwrapped discriminators, called frozen in the G phase so DDP never sees that use.
        pool_a, pool_b: this rank's histories of fake_a (for D_a) and fake_b (for D_b).
        precision: fp32, bf16 or fp16; fp16 scales both losses with one GradScaler.
        check_finite: agree across ranks on whether the losses are finite, and skip the update if not.
        distributed: ranks must agree on the update and on stopping (one 2-element all-reduce per step).
    """

    def __init__(
        self,
        gens: nn.Module,
        discs: nn.Module,
        discs_module: Discriminators,
        objective: Objective,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        pool_a: ImagePool,
        pool_b: ImagePool,
        device: torch.device,
        precision: str = "fp32",
        check_finite: bool = True,
        distributed: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.gens, self.discs, self.discs_module = gens, discs, discs_module
        self.objective = objective
        self.opt_g, self.opt_d = opt_g, opt_d
        self.pool_a, self.pool_b = pool_a, pool_b
        self.device = device
        self.precision = precision
        self.check_finite = check_finite
        self.distributed = distributed
        self.memory_format = memory_format
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        # Steps the GradScaler skipped for inf/NaN gradients, counted on the device (read at log time).
        self.scaler_skips = torch.zeros((), device=device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def __call__(self, real_a: Tensor, real_b: Tensor, stop_requested: bool = False) -> StepResult:
        """One step on this rank's batch; `stop_requested` is this rank's wish to stop after it."""
        D = self.discs_module
        scale = self.scaler.scale
        real_a = real_a.contiguous(memory_format=self.memory_format)
        real_b = real_b.contiguous(memory_format=self.memory_format)

        # G phase: D frozen and called unwrapped, so its DDP wrapper never marks parameters unused.
        set_requires_grad(D, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            out: dict[str, Tensor] = self.gens(real_a, real_b, self.objective.identity)
            g_losses = self.objective.generator_losses(out, real_a, real_b, D.D_a, D.D_b)
            loss_g = sum(g_losses.values())
        scale(loss_g).backward()

        # D phase: real images against fakes from this rank's history (stored in fp32).
        set_requires_grad(D, True)
        self.opt_d.zero_grad(set_to_none=True)
        fake_a = self.pool_a.query(out["fake_a"].detach())
        fake_b = self.pool_b.query(out["fake_b"].detach())
        with self.autocast():
            preds = self.discs(real_a, fake_a, real_b, fake_b)
            d_losses = self.objective.discriminator_losses(preds)
            loss_d = d_losses["D_a"] + d_losses["D_b"]
        scale(loss_d).backward()

        # Update: every rank takes the same decision, else parameters would drift apart.
        losses = {k: v.detach() for k, v in {**g_losses, **d_losses}.items()}
        applied, stop = True, stop_requested
        if self.check_finite or self.distributed:
            flags = torch.zeros(2, device=loss_g.device)
            if self.check_finite:
                flags[0] = (~torch.isfinite(loss_g.detach() + loss_d.detach())).float()
            flags[1] = float(stop_requested)
            bad, stop_any = all_reduce_max(flags).tolist()
            applied, stop = bad == 0.0, stop_any > 0.0
        if applied:
            self.scaler.step(self.opt_g)
            self.scaler.step(self.opt_d)
            if self.scaler.is_enabled():
                # update() lowers the scale exactly when a gradient was inf/NaN and the step was skipped.
                before = self.scaler._scale.clone()
                self.scaler.update()
                self.scaler_skips += (self.scaler._scale < before).float()
            else:
                self.scaler.update()
        else:
            self.pool_a.undo_last_query()
            self.pool_b.undo_last_query()
        fakes = {"fake_a": out["fake_a"].detach(), "fake_b": out["fake_b"].detach()}
        return StepResult(losses, applied, stop, fakes)
