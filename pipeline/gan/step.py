"""One CycleGAN optimisation step: the G phase, then the D phase, then the optimiser updates.

The order of SPEC.md is kept where it matters: the D phase trains on the fakes of the G phase's forward pass
(made before G's update), and D's parameters are the same before and after G's update. So both backward passes
can run before either optimiser steps, which lets one small collective per step decide, identically on every
rank, whether the update is applied (all losses finite) and whether training stops after it (a signal).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.engine.dist import all_reduce_max
from pipeline.gan.cyclegan import Discriminators, Objective
from pipeline.gan.stepping import PRECISIONS, Optimisers, Pools, StepResult, StepSettings, update_scale


@dataclass
class StepNetworks:
    """What the step calls: `gens`/`discs` may be DDP wrappers; `discs_module` is the unwrapped discriminators,
    called frozen in the G phase so DDP never sees that use."""

    gens: nn.Module
    discs: nn.Module
    discs_module: Discriminators


class TrainStep:
    """Runs the step on this rank, from named bundles: TrainStep(networks=..., objective=..., optimisers=...,
    pools=..., settings=...)."""

    def __init__(self, *, networks: StepNetworks, objective: Objective, optimisers: Optimisers, pools: Pools,
                 settings: StepSettings) -> None:
        self.networks, self.objective = networks, objective
        self.optimisers, self.pools, self.settings = optimisers, pools, settings
        # Steps the GradScaler skipped for inf/NaN gradients (fp16 only).
        self.scaler_skips = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.settings.device.type, dtype=PRECISIONS[self.settings.precision])

    def __call__(self, real_a: Tensor, real_b: Tensor, stop_requested: bool = False) -> StepResult:
        """One step on this rank's batch; `stop_requested` is this rank's wish to stop after it."""
        nets, opt, pools, settings = self.networks, self.optimisers, self.pools, self.settings
        D = nets.discs_module
        scale = opt.scaler.scale
        if settings.cudagraphs:
            # A new iteration: the graphs' output memory of the last step may be reused. Nothing still reads it:
            # the pools store copies, and the losses are computed outside the compiled networks.
            torch.compiler.cudagraph_mark_step_begin()
        real_a = real_a.contiguous(memory_format=settings.memory_format)
        real_b = real_b.contiguous(memory_format=settings.memory_format)

        # G phase: D frozen and called unwrapped, so its DDP wrapper never marks parameters unused.
        D.requires_grad_(False)
        opt.g.zero_grad(set_to_none=True)
        with self.autocast():
            out: dict[str, Tensor] = nets.gens(real_a, real_b, self.objective.identity)
            g_losses = self.objective.generator_losses(out, real_a, real_b, D.D_a, D.D_b)
            loss_g = sum(g_losses.values())
        scale(loss_g).backward()

        # D phase: real images against fakes from this rank's history (stored in fp32).
        D.requires_grad_(True)
        opt.d.zero_grad(set_to_none=True)
        fake_a = pools.a.query(out["fake_a"].detach())
        fake_b = pools.b.query(out["fake_b"].detach())
        with self.autocast():
            preds = nets.discs(real_a, fake_a, real_b, fake_b)
            d_losses = self.objective.discriminator_losses(preds)
            loss_d = d_losses["D_a"] + d_losses["D_b"]
        scale(loss_d).backward()

        # Update: every rank takes the same decision, else parameters would drift apart.
        losses = {k: v.detach() for k, v in {**g_losses, **d_losses}.items()}
        applied, stop = True, stop_requested
        if settings.check_finite or settings.distributed:
            flags = torch.zeros(2, device=loss_g.device)
            if settings.check_finite:
                flags[0] = (~torch.isfinite(loss_g.detach() + loss_d.detach())).float()
            flags[1] = float(stop_requested)
            bad, stop_any = all_reduce_max(flags).tolist()
            applied, stop = bad == 0.0, stop_any > 0.0
        if applied:
            opt.scaler.step(opt.g)
            opt.scaler.step(opt.d)
            self.scaler_skips += int(update_scale(opt.scaler))
        else:
            pools.a.undo_last_query()
            pools.b.undo_last_query()
        return StepResult(losses, applied, stop)

