"""The CycleGAN step written the way the reference implementation writes it, for comparisons only.

One network call per term, fp32, eager, separate backward passes for D_A and D_B, default (per-parameter)
Adam: `models/cycle_gan_model.py` of junyanz/pytorch-CycleGAN-and-pix2pix, in our names. Benchmarks time it
against `pipeline.gan.step.TrainStep` in the same run, and a test bounds the difference between the two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.gan.cyclegan import Discriminators, Generators, Objective
from pipeline.gan.image_pool import ImagePool
from pipeline.gan.losses import cycle_loss, identity_loss


def reference_adam(params, lr: float = 2e-4, beta1: float = 0.5, beta2: float = 0.999) -> torch.optim.Adam:
    return torch.optim.Adam(list(params), lr=lr, betas=(beta1, beta2))


class ReferenceStyleStep:
    def __init__(self, gens: Generators, discs: Discriminators, objective: Objective, opt_g: torch.optim.Optimizer,
                 opt_d: torch.optim.Optimizer, pool_a: ImagePool, pool_b: ImagePool) -> None:
        self.gens, self.discs, self.objective = gens, discs, objective
        self.opt_g, self.opt_d = opt_g, opt_d
        self.pool_a, self.pool_b = pool_a, pool_b

    def __call__(self, real_a: Tensor, real_b: Tensor) -> dict[str, Tensor]:
        G_ab, G_ba, D_a, D_b = self.gens.G_ab, self.gens.G_ba, self.discs.D_a, self.discs.D_b
        obj, gan = self.objective, self.objective.gan
        # forward()
        fake_b = G_ab(real_a)
        rec_a = G_ba(fake_b)
        fake_a = G_ba(real_b)
        rec_b = G_ab(fake_a)
        # optimize_parameters(): G_A and G_B
        for p in self.discs.parameters():
            p.requires_grad_(False)
        self.opt_g.zero_grad()
        losses = {}
        if obj.identity:
            losses["G_ab/idt"] = identity_loss(G_ab(real_b), real_b, obj.lambda_b * obj.lambda_idt)
            losses["G_ba/idt"] = identity_loss(G_ba(real_a), real_a, obj.lambda_a * obj.lambda_idt)
        losses["G_ab/gan"] = gan.generator(D_b(fake_b))
        losses["G_ba/gan"] = gan.generator(D_a(fake_a))
        losses["G_ab/cycle"] = cycle_loss(rec_a, real_a, obj.lambda_a)
        losses["G_ba/cycle"] = cycle_loss(rec_b, real_b, obj.lambda_b)
        sum(losses.values()).backward()
        self.opt_g.step()
        # D_A and D_B, one backward each
        for p in self.discs.parameters():
            p.requires_grad_(True)
        self.opt_d.zero_grad()
        pooled_b = self.pool_b.query(fake_b.detach())
        losses["D_b"] = gan.discriminator(D_b(real_b), D_b(pooled_b))
        losses["D_b"].backward()
        pooled_a = self.pool_a.query(fake_a.detach())
        losses["D_a"] = gan.discriminator(D_a(real_a), D_a(pooled_a))
        losses["D_a"].backward()
        self.opt_d.step()
        return {k: v.detach() for k, v in losses.items()}
