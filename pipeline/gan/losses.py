"""CycleGAN objective terms. Loss code computes losses only: it never steps, logs or looks at the rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GAN_MODES = ("lsgan", "vanilla", "hinge")


class GANLoss:
    """Adversarial loss on PatchGAN output maps, averaged over every patch of the batch.

    The discriminator loss carries the reference's factor 0.5 so that D learns at half the rate of G.
    """

    def __init__(self, mode: str = "lsgan") -> None:
        if mode not in GAN_MODES:
            raise ValueError(f"unknown gan_mode '{mode}'; choose one of {GAN_MODES}")
        self.mode = mode

    def generator(self, pred_fake: Tensor) -> Tensor:
        """Loss of a generator whose fakes D scored `pred_fake`: it wants them judged real."""
        if self.mode == "lsgan":
            return F.mse_loss(pred_fake, torch.ones_like(pred_fake))
        if self.mode == "vanilla":
            # -log(sigmoid(pred_fake))
            return F.binary_cross_entropy_with_logits(pred_fake, torch.ones_like(pred_fake))
        return -pred_fake.mean()

    def discriminator(self, pred_real: Tensor, pred_fake: Tensor) -> Tensor:
        """Loss of a discriminator that scored real images `pred_real` and (detached) fakes `pred_fake`."""
        if self.mode == "lsgan":
            real = F.mse_loss(pred_real, torch.ones_like(pred_real))
            fake = F.mse_loss(pred_fake, torch.zeros_like(pred_fake))
        elif self.mode == "vanilla":
            real = F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real))
            fake = F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake))
        else:
            real = F.relu(1.0 - pred_real).mean()
            fake = F.relu(1.0 + pred_fake).mean()
        return 0.5 * (real + fake)


def cycle_loss(reconstructed: Tensor, original: Tensor, weight: float) -> Tensor:
    """weight * L1(G_back(G_forth(x)), x)."""
    return F.l1_loss(reconstructed, original) * weight


def identity_loss(same: Tensor, original: Tensor, weight: float) -> Tensor:
    """weight * L1(G_xy(y), y): a generator fed its own target domain should change nothing."""
    return F.l1_loss(same, original) * weight
