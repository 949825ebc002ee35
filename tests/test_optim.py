import pytest
import torch

from pipeline.engine.optim import build_adam, lr_factor


def test_constant_then_linear_decay():
    total = 200
    assert lr_factor(0, total) == 1.0
    assert lr_factor(99, total) == 1.0
    assert lr_factor(100, total) == pytest.approx(1 - 1 / 101)
    assert lr_factor(199, total) == pytest.approx(1 / 101)
    factors = [lr_factor(s, total) for s in range(total)]
    assert all(x >= y for x, y in zip(factors, factors[1:]))


def test_matches_the_reference_epoch_rule():
    # Reference LambdaLR: lr_l = 1 - max(0, k + epoch_count - n_epochs) / (n_epochs_decay + 1), k from 0.
    n_epochs, n_decay, epoch_count = 100, 100, 1
    for k in range(n_epochs + n_decay):
        reference = 1.0 - max(0, k + epoch_count - n_epochs) / float(n_decay + 1)
        assert lr_factor(k, n_epochs + n_decay) == pytest.approx(reference)


def test_adam_settings():
    opt = build_adam([torch.nn.Parameter(torch.zeros(2))], 2e-4, 0.5, 0.999)
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)
