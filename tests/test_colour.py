"""Networks that see colour and intensity: the paper's generator is blind to a colour cast (a property of its
first bias-free convolution followed by instance norm), the colour variants are not, and they tile, export and
keep the reference networks' interop unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.engine.checkpoint import CheckpointError
from pipeline.gan.colour import ColourGenerator, StatisticsDiscriminator, colour_transfer
from pipeline.gan.cut.networks import build_cut_discriminator, build_cut_generator
from pipeline.gan.networks import discriminator_from, generator_from
from pipeline.infer.export import check_export, export_onnx, export_torchscript
from pipeline.infer.generators import PaddedGenerator
from pipeline.infer.interop import nets_from_checkpoint
from pipeline.infer.tiled import TiledForward

SMALL = ["model.generator=resnet_6blocks", "model.ngf=8", "model.ndf=8"]
MIX = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])


def model(*settings: str):
    return load_config([], [*SMALL, *settings]).model


def images(seed: int) -> torch.Tensor:
    """Images inside [-0.7, 0.7], so that a cast of 0.3 stays inside [-1, 1]."""
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 1.4 - 0.7


@torch.no_grad()
def responses(net: nn.Module) -> dict[str, float]:
    """Mean |net(y) - net(x)| for y a colour cast, an exposure change, a channel mix and an unrelated image."""
    net.eval()
    x, other = images(0), images(1)
    out = net(x)
    change = {"cast": x + 0.3, "exposure": 0.7 * x, "mix": torch.einsum("ij,bjhw->bihw", MIX, x), "unrelated": other}
    return {name: (net(y) - out).abs().mean().item() for name, y in change.items()}


@torch.no_grad()
def trained_like(net: ColourGenerator) -> ColourGenerator:
    """The colour generator with its zero-initialised output layers made non-zero, as training makes them."""
    generator = torch.Generator().manual_seed(3)
    for branch in (net.body, net.colour):
        last = [m for m in branch.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.05)
        last.bias.copy_(torch.randn(last.bias.shape, generator=generator) * 0.05)
    return net


@pytest.mark.parametrize("method", ["cyclegan", "cut"])
def test_the_reference_generator_is_blind_to_a_colour_cast_and_nearly_to_exposure(method):
    torch.manual_seed(0)
    cfg = model(f"model.method={method}")
    seen = responses(generator_from(cfg) if method == "cyclegan" else build_cut_generator(cfg, 6))
    assert seen["cast"] < 1e-6 + 1e-4 * seen["unrelated"]  # Exactly blind, up to float round-off.
    assert seen["exposure"] < 0.05 * seen["unrelated"]
    assert seen["unrelated"] > 0  # Not a constant network.


@pytest.mark.parametrize("method", ["cyclegan", "cut"])
@pytest.mark.parametrize("state", ["initial", "trained-like"])
def test_the_colour_generator_sees_cast_exposure_and_mix(method, state):
    torch.manual_seed(0)
    cfg = model(f"model.method={method}", "model.g_variant=colour")
    net = generator_from(cfg) if method == "cyclegan" else build_cut_generator(cfg, 6)
    assert isinstance(net, ColourGenerator)
    if state == "initial":  # It starts as the identity (within the clamp that keeps atanh finite).
        x = images(0)
        assert (net.eval()(x) - x).abs().max() < 1e-5
    else:
        trained_like(net)
    seen = responses(net)
    assert seen["cast"] > 0.3 * seen["unrelated"] and seen["exposure"] > 0.1 * seen["unrelated"]
    assert seen["mix"] > 0.1 * seen["unrelated"]


@pytest.mark.parametrize("variant", ["spectral", "colour"])
@pytest.mark.parametrize("method", ["cyclegan", "cut"])
def test_the_new_discriminators_see_exposure(method, variant):
    def build(variant):
        torch.manual_seed(0)
        cfg = model(f"model.method={method}", f"model.d_variant={variant}")
        return discriminator_from(cfg) if method == "cyclegan" else build_cut_discriminator(cfg)

    reference, new = responses(build("reference")), responses(build(variant))
    # Relative to what an unrelated image changes: the reference D hardly sees an exposure change.
    assert new["exposure"] > 0.15 * new["unrelated"]
    if method == "cyclegan":  # (CUT's blur-pooled PatchGAN sees some exposure already.)
        assert reference["exposure"] < 0.05 * reference["unrelated"]
        assert new["exposure"] / new["unrelated"] > 5 * reference["exposure"] / reference["unrelated"]
    assert not any(isinstance(m, (nn.InstanceNorm2d, nn.GroupNorm)) for m in build(variant).modules())


def test_the_colour_discriminator_scores_each_images_colour_statistics():
    torch.manual_seed(0)
    net = discriminator_from(model("model.d_variant=colour")).eval()  # Eval: spectral norm's vectors stay put.
    assert isinstance(net, StatisticsDiscriminator)
    x = images(0)
    head = net.statistics
    # Its statistics: 3 channel means and the 6 entries of the channel covariance, what a cast or a mix changes.
    for change in (lambda t: t + 0.2, lambda t: t[:, [1, 2, 0]], lambda t: 0.6 * t):
        assert (head(change(x)) - head(x)).abs().min() > 0
    # And each channel's quantiles, the tone curve: two images of equal means and covariance, one of evenly spread
    # values and one of two values (a gamma or a film look changes this, two moments cannot see it).
    spread = torch.linspace(-0.9, 0.9, 32 * 32)
    two = torch.where(torch.arange(32 * 32) % 2 == 0, 1.0, -1.0) * spread.pow(2).mean().sqrt()
    even, split = (v.reshape(1, 1, 32, 32).expand(1, 3, 32, 32) for v in (spread, two))
    assert torch.allclose(even.mean((2, 3)), split.mean((2, 3)), atol=1e-6)
    assert torch.allclose(even.flatten(2).pow(2).mean(-1), split.flatten(2).pow(2).mean(-1), atol=1e-6)
    assert (head(even) - head(split)).abs().item() > 1e-3
    # The score is added to every patch's: the patch map's spatial structure is the spectral PatchGAN's.
    with torch.no_grad():
        diff = net(x) - net.patches(x)
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))


@pytest.mark.parametrize("start", ["identity", "transfer"])
def test_the_colour_generator_tiles_exactly(start):
    torch.manual_seed(0)
    net = trained_like(generator_from(model("model.g_variant=colour", "model.init_gain=0.3",
                                            f"model.colour_start={start}"))).eval()
    if start == "transfer":
        net.start_from(MIX, torch.tensor([0.05, -0.02, 0.01]))
    x = torch.rand(1, 3, 44, 60, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want = net(x)
    got = TiledForward(tile=12, device=torch.device("cpu"))(net, x)
    assert want.std() > 0.1 and (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_colour_generator_exports(tmp_path, fmt):
    torch.manual_seed(0)
    generator = trained_like(generator_from(model("model.g_variant=colour", "model.colour_start=transfer")))
    generator.start_from(MIX, torch.tensor([0.05, -0.02, 0.01]))
    net = PaddedGenerator(generator.eval(), 4)
    path = tmp_path / f"g.{'pt' if fmt == 'torchscript' else 'onnx'}"
    (export_torchscript if fmt == "torchscript" else export_onnx)(net, path, {"g_variant": "colour"})
    assert check_export(net, path, fmt, [(1, 32, 32), (2, 37, 53)]) < 1e-4


def test_reference_files_refuse_the_colour_variants_by_name(tmp_path):
    from pipeline.config import to_yaml
    from pipeline.engine.checkpoint import FORMAT, save_atomic

    cfg = load_config([], [*SMALL, "model.g_variant=colour", "model.d_variant=spectral"])
    torch.manual_seed(0)
    nets = {name: (generator_from(cfg.model) if name.startswith("G") else discriminator_from(cfg.model)).state_dict()
            for name in ("G_ab", "G_ba", "D_a", "D_b")}
    path = tmp_path / "ckpt-000000001.pt"
    save_atomic({"format": FORMAT, "config": to_yaml(cfg), "step": 1, "mlflow_run_id": "", "nets": nets}, path)
    with pytest.raises(CheckpointError, match="model.g_variant=colour, model.d_variant=spectral: the reference"):
        nets_from_checkpoint(path, cfg.model)


def test_the_colour_transfer_carries_one_domains_pixel_moments_onto_the_others():
    g = torch.Generator().manual_seed(4)
    source = torch.randn(20000, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[0.3, 0.1, 0.0], [0.0, 0.2, 0.05], [0.1, 0.0, 0.25]], dtype=torch.float64) + 0.1
    target = torch.randn(20000, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[0.2, 0.0, 0.1], [0.05, 0.3, 0.0], [0.0, 0.1, 0.15]], dtype=torch.float64) - 0.2
    weight, bias = colour_transfer(source.mean(0), source.T.cov(correction=0), target.mean(0),
                                   target.T.cov(correction=0))
    moved = source @ weight.double().T + bias.double()
    assert torch.allclose(moved.mean(0), target.mean(0), atol=1e-6)
    assert torch.allclose(moved.T.cov(correction=0), target.T.cov(correction=0), atol=1e-6)
    # The map that moves the pixels least: symmetric positive definite (Monge-Kantorovich), not any whitening.
    assert torch.allclose(weight, weight.T, atol=1e-6) and torch.linalg.eigvalsh(weight.double()).min() > 0
    # One channel (an intensity window): the ratio of the spreads, and the means matched.
    weight, bias = colour_transfer(torch.tensor([0.5]), torch.tensor([[0.04]]), torch.tensor([-0.1]),
                                   torch.tensor([[0.09]]))
    assert torch.allclose(weight, torch.tensor([[1.5]])) and torch.allclose(bias, torch.tensor([-0.85]))
    # A grey source seen in RGB varies along one direction only: its chroma directions are not inverted but go to
    # the target's mean; stored as JPEG, with a little chroma noise, the same (not a gain of a hundred).
    target_mean = torch.tensor([0.1, 0.0, -0.1])
    chroma = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
    for noise in (0.0, 2e-6):
        grey = torch.full((3, 3), 0.04) + noise * torch.eye(3)
        weight, bias = colour_transfer(torch.full((3,), -0.3), grey, target_mean, torch.eye(3) * 0.05)
        assert torch.allclose(chroma @ weight.T, torch.zeros(2, 3), atol=1e-6), noise
        assert torch.allclose(weight @ torch.full((3,), -0.3) + bias, target_mean, atol=1e-6)
        assert torch.linalg.matrix_norm(weight, ord=2) < 1.0


def test_the_fitted_colour_map_runs_in_float32_under_bf16_autocast():
    """In bf16 0.999 rounds to 1, where atanh is infinite: the skip's output must stay float32, or a pixel at the
    end of the range gives an infinite logit and a NaN gradient through the cycle."""
    torch.manual_seed(0)
    net = generator_from(model("model.g_variant=colour", "model.colour_start=transfer"))
    net.start_from(torch.eye(3), torch.zeros(3))
    x = images(0).clone()
    x[:, :, :4] = 1.0
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method", ["cyclegan", "cut"])
def test_a_colour_generator_started_from_a_transfer_begins_as_that_colour_map(method):
    torch.manual_seed(0)
    cfg = model("model.g_variant=colour", "model.colour_start=transfer", f"model.method={method}")
    net = (generator_from(cfg) if method == "cyclegan" else build_cut_generator(cfg, 6)).eval()
    weight, bias = MIX * 0.9, torch.tensor([0.05, -0.02, 0.01])
    net.start_from(weight, bias)
    x = images(0)
    with torch.no_grad():
        assert (net(x) - (torch.einsum("ij,bjhw->bihw", weight, x) + bias[:, None, None])).abs().max() < 1e-5
    assert {"skip.weight", "skip.bias"} <= net.state_dict().keys()  # Checkpointed with the network.
    assert not any(p is net.skip.weight for p in net.parameters())  # Fitted, never trained.
    # The identity start keeps the module tree (and the checkpoints) of before the option.
    plain = generator_from(model("model.g_variant=colour"))
    assert not any(k.startswith("skip.") for k in plain.state_dict())
    with pytest.raises(ValueError, match="start=identity"):
        plain.start_from(weight, bias)


def test_colour_start_needs_the_colour_generator():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="model.colour_start=transfer .* set model.g_variant=colour"):
        load_config([], ["model.colour_start=transfer"])
    with pytest.raises(ConfigError, match="model.colour_start"):
        load_config([], ["model.g_variant=colour", "model.colour_start=histogram"])
