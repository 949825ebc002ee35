import math

import pytest
import torch

from pipeline.gan.losses import GANLoss, cycle_loss, identity_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_lsgan_hand_computed():
    gan = GANLoss("lsgan")
    assert gan.generator(t(0.5, 1.5)).item() == pytest.approx(0.25)  # mean((p - 1)^2)
    # 0.5 * [mean((real - 1)^2) + mean(fake^2)] = 0.5 * [0.5 + 0.25]
    assert gan.discriminator(t(1.0, 0.0), t(0.5, -0.5)).item() == pytest.approx(0.375)


def test_vanilla_hand_computed():
    gan = GANLoss("vanilla")
    assert gan.generator(t(0.0, 0.0)).item() == pytest.approx(math.log(2))
    x = 2.0
    real = -math.log(1 / (1 + math.exp(-x)))
    fake = -math.log(1 - 1 / (1 + math.exp(-x)))  # -log(1 - sigmoid(fake))
    assert gan.discriminator(t(x), t(x)).item() == pytest.approx(0.5 * (real + fake))


def test_hinge_hand_computed():
    gan = GANLoss("hinge")
    assert gan.generator(t(0.5, -1.5)).item() == pytest.approx(0.5)
    # 0.5 * [mean(relu(1 - real)) + mean(relu(1 + fake))] = 0.5 * [(0.5 + 0) / 2 + (2 + 0) / 2]
    assert gan.discriminator(t(0.5, 3.0), t(1.0, -2.0)).item() == pytest.approx(0.5 * (0.25 + 1.0))


def test_cycle_and_identity_are_weighted_l1():
    a, b = t(0.0, 1.0, -1.0), t(0.5, 0.0, -1.0)
    assert cycle_loss(a, b, 10.0).item() == pytest.approx(10 * 1.5 / 3)
    assert identity_loss(a, b, 10.0 * 0.5).item() == pytest.approx(5 * 1.5 / 3)


def test_unknown_mode():
    with pytest.raises(ValueError, match="wgan"):
        GANLoss("wgan")
