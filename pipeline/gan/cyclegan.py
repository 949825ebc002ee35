"""The CycleGAN model: two generators, two discriminators, and the objective assembled from losses.py.

Directions are explicit: G_ab translates A->B and D_b judges domain B (real_b vs fake_b). In the reference
implementation's names G_ab is G_A, G_ba is G_B, D_b is D_A and D_a is D_B; `reference_names` maps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.data.images import project_channels
from pipeline.gan.losses import GANLoss, cycle_loss, identity_loss
from pipeline.gan.networks import discriminator_from, generator_from, use_group_kernel_instance_norm

# Our network name -> the reference implementation's (file `<epoch>_net_<name>.pth`, loss suffix).
REFERENCE_NAMES = {"G_ab": "G_A", "G_ba": "G_B", "D_b": "D_A", "D_a": "D_B"}


class Generators(nn.Module):
    """Both generators in one module, so one DDP wrapper averages their gradients in one pass.

    With `fused`, each generator translates its input and its identity input in one batched call (4 calls
    instead of 6). InstanceNorm keeps samples independent, so only the floating-point summation order changes;
    batch norm would mix them, so fusing is refused with it.

    The identity inputs are the other domain's images, seen through the generator's input channels where the
    domains' channel counts differ (`project_channels`): G_ab gets B's luminance and should give B back (for a
    colourisation, the identity term is G_ab(gray(b)) = b), G_ba gets A replicated. Equal counts: unchanged.
    """

    def __init__(self, G_ab: nn.Module, G_ba: nn.Module, fused: bool = False, channels: tuple[int, int] = (3, 3)):
        super().__init__()
        self.G_ab = G_ab
        self.G_ba = G_ba
        self.fused = fused
        self.channels = channels

    def forward(self, real_a: Tensor, real_b: Tensor, identity: bool) -> dict[str, Tensor]:
        if identity:
            real_b_as_a = project_channels(real_b, self.channels[0])
            real_a_as_b = project_channels(real_a, self.channels[1])
        if self.fused and identity:
            n = real_a.shape[0]
            fake_b, idt_b = self.G_ab(torch.cat([real_a, real_b_as_a])).split([n, real_b.shape[0]])
            fake_a, idt_a = self.G_ba(torch.cat([real_b, real_a_as_b])).split([real_b.shape[0], n])
            return {"fake_b": fake_b, "rec_a": self.G_ba(fake_b), "fake_a": fake_a, "rec_b": self.G_ab(fake_a),
                    "idt_b": idt_b, "idt_a": idt_a}
        fake_b = self.G_ab(real_a)
        rec_a = self.G_ba(fake_b)
        fake_a = self.G_ba(real_b)
        rec_b = self.G_ab(fake_a)
        out = {"fake_b": fake_b, "rec_a": rec_a, "fake_a": fake_a, "rec_b": rec_b}
        if identity:
            out["idt_b"] = self.G_ab(real_b_as_a)
            out["idt_a"] = self.G_ba(real_a_as_b)
        return out


class Discriminators(nn.Module):
    """Both discriminators in one module; the D losses are summed and backpropagated once.

    Two separate backward passes through one DDP wrapper raise "Expected to have finished reduction".
    """

    def __init__(self, D_a: nn.Module, D_b: nn.Module, fused: bool = False) -> None:
        super().__init__()
        self.D_a = D_a
        self.D_b = D_b
        self.fused = fused

    def forward(self, real_a: Tensor, fake_a: Tensor, real_b: Tensor, fake_b: Tensor) -> dict[str, Tensor]:
        if self.fused:  # Real and pooled fake in one batch per discriminator.
            pred_real_a, pred_fake_a = self.D_a(torch.cat([real_a, fake_a])).split([len(real_a), len(fake_a)])
            pred_real_b, pred_fake_b = self.D_b(torch.cat([real_b, fake_b])).split([len(real_b), len(fake_b)])
            return {"real_a": pred_real_a, "fake_a": pred_fake_a, "real_b": pred_real_b, "fake_b": pred_fake_b}
        return {
            "real_a": self.D_a(real_a),
            "fake_a": self.D_a(fake_a),
            "real_b": self.D_b(real_b),
            "fake_b": self.D_b(fake_b),
        }


@dataclass(frozen=True)
class Objective:
    """Weights of the CycleGAN objective (SPEC.md: lambda_a = lambda_b = 10, lambda_idt = 0.5)."""

    gan: GANLoss
    lambda_a: float = 10.0
    lambda_b: float = 10.0
    lambda_idt: float = 0.5

    @property
    def identity(self) -> bool:
        return self.lambda_idt > 0

    def generator_losses(
        self, out: dict[str, Tensor], real_a: Tensor, real_b: Tensor, D_a: nn.Module, D_b: nn.Module
    ) -> dict[str, Tensor]:
        """Loss terms of both generators; D_a and D_b must be frozen and unwrapped (not DDP)."""
        losses = {
            "G_ab/gan": self.gan.generator(D_b(out["fake_b"])),
            "G_ba/gan": self.gan.generator(D_a(out["fake_a"])),
            "G_ab/cycle": cycle_loss(out["rec_a"], real_a, self.lambda_a),
            "G_ba/cycle": cycle_loss(out["rec_b"], real_b, self.lambda_b),
        }
        if self.identity:
            losses["G_ab/idt"] = identity_loss(out["idt_b"], real_b, self.lambda_b * self.lambda_idt)
            losses["G_ba/idt"] = identity_loss(out["idt_a"], real_a, self.lambda_a * self.lambda_idt)
        return losses

    def discriminator_losses(self, preds: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "D_a": self.gan.discriminator(preds["real_a"], preds["fake_a"]),
            "D_b": self.gan.discriminator(preds["real_b"], preds["fake_b"]),
        }


def build_networks(model_cfg, fused: bool = False,
                   group_kernel_norm: bool = False) -> tuple[Generators, Discriminators]:
    """The four networks of a `ModelConfig`, initialised from torch's global RNG.

    Args:
        fused: batch each generator's and discriminator's inputs into one call (see `Generators`).
        group_kernel_norm: instance norms computed by GroupNorm's faster kernel (`GroupKernelInstanceNorm2d`).
    """
    if fused and model_cfg.norm == "batch":
        raise ValueError("perf.fused_calls batches different images through one norm layer; with "
                         "model.norm=batch that changes the maths: set perf.fused_calls=false")
    G_ab, G_ba = generator_from(model_cfg, "a", "b"), generator_from(model_cfg, "b", "a")
    D_a, D_b = discriminator_from(model_cfg, "a"), discriminator_from(model_cfg, "b")
    if group_kernel_norm:
        for net in (G_ab, G_ba, D_a, D_b):
            use_group_kernel_instance_norm(net)
    channels = (getattr(model_cfg, "channels_a", 3), getattr(model_cfg, "channels_b", 3))
    return Generators(G_ab, G_ba, fused, channels), Discriminators(D_a, D_b, fused)


def build_objective(loss_cfg) -> Objective:
    return Objective(GANLoss(loss_cfg.gan_mode), loss_cfg.lambda_a, loss_cfg.lambda_b, loss_cfg.lambda_idt)
