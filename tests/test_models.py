"""Networks equal the reference implementation: parameter counts, state_dict keys and shapes, output sizes."""

import pytest
import torch

from pipeline.models import (
    DISCRIMINATOR_ARCHS,
    GENERATOR_ARCHS,
    INIT_TYPES,
    build_discriminator,
    build_generator,
    count_parameters,
)

REFERENCE_COUNTS = {
    ("G", "resnet_9blocks"): 11_378_179,
    ("G", "resnet_6blocks"): 7_837_699,
    ("G", "unet_256"): 54_409_603,
    ("G", "unet_128"): 41_825_667,
    ("D", "basic"): 2_764_737,
    ("D", "n_layers4"): 6_959_553,
    ("D", "pixel"): 8_705,
}


def build(kind, arch, **kw):
    if kind == "G":
        return build_generator(arch, **kw)
    if arch == "n_layers4":
        return build_discriminator("n_layers", n_layers=4, **kw)
    return build_discriminator(arch, **kw)


@pytest.mark.parametrize("kind,arch", list(REFERENCE_COUNTS))
def test_parameter_counts_equal_the_reference(kind, arch):
    assert count_parameters(build(kind, arch)) == REFERENCE_COUNTS[(kind, arch)]


def test_resnet_keys_are_the_references():
    state = build_generator("resnet_9blocks").state_dict()
    # 3 convs + 2 transposed convs + 9 blocks x 2 convs + final conv, each with weight and bias.
    assert len(state) == 2 * (3 + 2 + 18 + 1)
    assert state["model.1.weight"].shape == (64, 3, 7, 7)
    assert state["model.4.weight"].shape == (128, 64, 3, 3)
    assert state["model.10.conv_block.1.weight"].shape == (256, 256, 3, 3)
    assert state["model.18.conv_block.5.bias"].shape == (256,)
    assert state["model.19.weight"].shape == (256, 128, 3, 3)  # ConvTranspose: (in, out, k, k)
    assert state["model.26.weight"].shape == (3, 64, 7, 7) and state["model.26.bias"].shape == (3,)
    six = build_generator("resnet_6blocks").state_dict()
    assert "model.23.bias" in six and "model.26.bias" not in six


def test_discriminator_keys_are_the_references():
    keys = set(build_discriminator("basic").state_dict())
    assert keys == {f"model.{i}.{p}" for i in (0, 2, 5, 8, 11) for p in ("weight", "bias")}
    assert set(build_discriminator("pixel").state_dict()) == {f"net.{i}.{p}" for i in (0, 2, 5)
                                                              for p in ("weight", "bias")}


def test_unet_keys_are_the_references():
    state = build_generator("unet_256").state_dict()
    assert state["model.model.0.weight"].shape == (64, 3, 4, 4)
    assert state["model.model.3.weight"].shape == (128, 3, 4, 4)  # outermost ConvTranspose
    assert state["model.model.1.model.1.weight"].shape == (128, 64, 4, 4)
    assert "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.model.1.weight" in state  # innermost


def test_d_output_is_30x30_at_256_and_14x14_at_128():
    D = build_discriminator("basic", ndf=8)
    with torch.no_grad():
        assert D(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        assert D(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 14, 14)
        assert build_discriminator("pixel", ndf=8)(torch.zeros(1, 3, 16, 16)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize("arch,size", [("resnet_9blocks", 64), ("resnet_6blocks", 44), ("unet_128", 128)])
def test_generator_output_matches_input_and_lies_in_range(arch, size):
    G = build_generator(arch, ngf=8)
    with torch.no_grad():
        y = G(torch.randn(2, 3, size, size))
    assert y.shape == (2, 3, size, size) and y.abs().max() <= 1.0


def test_state_dict_round_trip_strict(tmp_path):
    torch.manual_seed(0)
    G = build_generator("resnet_6blocks", ngf=8)
    torch.save(G.state_dict(), tmp_path / "latest_net_G_A.pth")
    H = build_generator("resnet_6blocks", ngf=8)
    H.load_state_dict(torch.load(tmp_path / "latest_net_G_A.pth", weights_only=True), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(G(x), H(x))


def test_norms_buffers_and_bias_rule():
    assert not list(build_generator("resnet_6blocks", ngf=8).buffers())  # instance norm has no statistics
    assert list(build_generator("resnet_6blocks", ngf=8, norm="batch").buffers())
    # Bias in front of InstanceNorm, none in front of BatchNorm (the reference's use_bias rule).
    assert build_generator("resnet_6blocks", ngf=8).model[1].bias is not None
    assert build_generator("resnet_6blocks", ngf=8, norm="batch").model[1].bias is None


def test_init_types():
    torch.manual_seed(0)
    D = build_discriminator("basic")
    weight = D.model[8].weight
    assert abs(weight.std().item() - 0.02) < 0.001 and D.model[8].bias.abs().sum() == 0
    for init_type in INIT_TYPES:
        build_discriminator("basic", ndf=8, init_type=init_type)
    torch.manual_seed(1)
    a = build_generator("resnet_6blocks", ngf=8).state_dict()
    torch.manual_seed(1)
    b = build_generator("resnet_6blocks", ngf=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fn,arg,bad", [(build_generator, "arch", "resnet_7blocks"),
                                        (build_discriminator, "arch", "patch"),
                                        (build_generator, "norm", "layer"),
                                        (build_generator, "init_type", "uniform")])
def test_unknown_choices_are_named(fn, arg, bad):
    kwargs = {"arch": GENERATOR_ARCHS[1] if fn is build_generator else DISCRIMINATOR_ARCHS[0]}
    kwargs[arg] = bad
    with pytest.raises(ValueError, match=bad):
        fn(**kwargs)


def test_a_tiny_generator_learns_a_fixed_colour_map(synthetic):
    """Supervised check that gradients reach every layer: G learns the synthetic A->B colour map."""
    import random

    torch.manual_seed(0)
    rng = random.Random(0)
    a = torch.stack([torch.from_numpy(synthetic.scene(rng, 24)).permute(2, 0, 1) for _ in range(16)])
    b = torch.from_numpy(synthetic.to_domain_b(a.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    a, b = a.float() / 127.5 - 1, b.float() / 127.5 - 1
    G = build_generator("resnet_6blocks", ngf=4)
    opt = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(150):
        loss = (G(a) - b).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.25 * losses[0], (losses[0], losses[-10:])
