"""The networks equal the reference implementation's: parameter counts, state_dict keys and shapes, output
sizes, norm and init behaviour, and strict round trips of saved weights."""

import copy
import functools
import math

import pytest
import torch
from torch import nn

from pipeline.config import GENERATORS
from pipeline.gan.networks import (
    DISCRIMINATOR_ARCHS,
    GENERATOR_ARCHS,
    INIT_TYPES,
    NORMS,
    PADDINGS,
    GroupKernelInstanceNorm2d,
    build_discriminator,
    build_generator,
    count_parameters,
    use_group_kernel_instance_norm,
)

# Parameter counts of the reference code (junyanz/pytorch-CycleGAN-and-pix2pix) at ngf = ndf = 64.
REFERENCE_COUNTS = {
    ("G", "resnet_9blocks", "instance"): 11_378_179,
    ("G", "resnet_6blocks", "instance"): 7_837_699,
    ("G", "unet_256", "instance"): 54_409_603,
    ("G", "unet_128", "instance"): 41_825_667,
    ("D", "basic", "instance"): 2_764_737,
    ("D", "n_layers4", "instance"): 6_959_553,
    ("D", "pixel", "instance"): 8_705,
    # Batch norm drops the biases in front of norms and adds BatchNorm's weight and bias; none drops them.
    ("G", "resnet_9blocks", "batch"): 11_383_427,
    ("G", "resnet_9blocks", "none"): 11_372_931,
    ("G", "unet_128", "batch"): 41_828_995,
    ("D", "basic", "batch"): 2_765_633,
    ("D", "basic", "none"): 2_763_841,
    ("D", "pixel", "none"): 8_576,
}


def build(kind: str, arch: str, **kwargs) -> nn.Module:
    if kind == "G":
        return build_generator(arch, **kwargs)
    if arch == "n_layers4":
        return build_discriminator("n_layers", n_layers=4, **kwargs)
    return build_discriminator(arch, **kwargs)


@functools.cache
def default_net(kind: str, arch: str) -> nn.Module:
    """Full-size nets at the reference defaults, built once per session (the U-Nets are ~50 M parameters)."""
    torch.manual_seed(0)
    return build(kind, arch)


def conv_pattern_keys(indices, suffixes=("weight", "bias")) -> set[str]:
    return {f"{i}.{s}" for i in indices for s in suffixes}


@pytest.mark.parametrize("kind,arch,norm", list(REFERENCE_COUNTS))
def test_parameter_counts_equal_the_reference(kind, arch, norm):
    net = default_net(kind, arch) if norm == "instance" else build(kind, arch, norm=norm)
    assert count_parameters(net) == REFERENCE_COUNTS[(kind, arch, norm)]


def test_resnet_9blocks_keys_and_shapes_are_the_references():
    state = default_net("G", "resnet_9blocks").state_dict()
    # Conv at 1, downsamplings at 4 and 7, blocks at 10..18 (convs at conv_block.1 and .5), transposed convs
    # at 19 and 22, final conv at 26; parameter-free pads, norms and activations take the indices between.
    expected = conv_pattern_keys(["model.1", "model.4", "model.7", "model.19", "model.22", "model.26"])
    expected |= conv_pattern_keys([f"model.{b}.conv_block.{c}" for b in range(10, 19) for c in (1, 5)])
    assert set(state) == expected and len(state) == 48
    assert state["model.1.weight"].shape == (64, 3, 7, 7)
    assert state["model.4.weight"].shape == (128, 64, 3, 3)
    assert state["model.7.weight"].shape == (256, 128, 3, 3)
    assert state["model.10.conv_block.1.weight"].shape == (256, 256, 3, 3)
    assert state["model.18.conv_block.5.bias"].shape == (256,)
    assert state["model.19.weight"].shape == (256, 128, 3, 3)  # ConvTranspose2d weights are (in, out, k, k).
    assert state["model.22.weight"].shape == (128, 64, 3, 3)
    assert state["model.26.weight"].shape == (3, 64, 7, 7) and state["model.26.bias"].shape == (3,)


def test_resnet_6blocks_keys_are_the_references():
    state = default_net("G", "resnet_6blocks").state_dict()
    expected = conv_pattern_keys(["model.1", "model.4", "model.7", "model.16", "model.19", "model.23"])
    expected |= conv_pattern_keys([f"model.{b}.conv_block.{c}" for b in range(10, 16) for c in (1, 5)])
    assert set(state) == expected
    assert state["model.23.weight"].shape == (3, 64, 7, 7)


def test_discriminator_keys_are_the_references():
    basic = default_net("D", "basic").state_dict()
    assert set(basic) == conv_pattern_keys([f"model.{i}" for i in (0, 2, 5, 8, 11)])
    assert basic["model.0.weight"].shape == (64, 3, 4, 4)
    assert basic["model.8.weight"].shape == (512, 256, 4, 4)
    assert basic["model.11.weight"].shape == (1, 512, 4, 4)
    deeper = default_net("D", "n_layers4").state_dict()
    assert set(deeper) == conv_pattern_keys([f"model.{i}" for i in (0, 2, 5, 8, 11, 14)])
    assert deeper["model.11.weight"].shape == (512, 512, 4, 4)
    pixel = default_net("D", "pixel").state_dict()
    assert set(pixel) == conv_pattern_keys([f"net.{i}" for i in (0, 2, 5)])
    assert pixel["net.5.weight"].shape == (1, 128, 1, 1)


def test_unet_keys_and_shapes_are_the_references():
    state = default_net("G", "unet_256").state_dict()
    assert all(k.startswith("model.model.") for k in state) and len(state) == 32  # 8 levels x 2 convs x 2.
    # Outermost level: [downconv, submodule, relu, upconv, tanh].
    assert state["model.model.0.weight"].shape == (64, 3, 4, 4)
    assert state["model.model.3.weight"].shape == (128, 3, 4, 4) and state["model.model.3.bias"].shape == (3,)
    # Middle levels: [lrelu, downconv, norm, submodule, relu, upconv, norm], so the next level sits at .3.
    assert state["model.model.1.model.1.weight"].shape == (128, 64, 4, 4)
    assert state["model.model.1.model.5.weight"].shape == (256, 64, 4, 4)
    assert "model.model.1.model.3.model.1.weight" in state
    assert "model.model.1.model.3.weight" not in state  # .3 is a submodule, not a layer.
    # Innermost level (the 8th): [lrelu, downconv, relu, upconv, norm].
    innermost = "model.model.1" + ".model.3" * 6
    assert state[innermost + ".model.1.weight"].shape == (512, 512, 4, 4)
    assert state[innermost + ".model.3.weight"].shape == (512, 512, 4, 4)
    assert len(default_net("G", "unet_128").state_dict()) == 28


def test_dropout_shifts_keys_as_in_the_reference():
    net = build_generator("resnet_6blocks", ngf=8, use_dropout=True)
    assert "model.10.conv_block.6.weight" in net.state_dict()
    unet = build_generator("unet_128", ngf=8, use_dropout=True)
    assert any(isinstance(m, nn.Dropout) for m in unet.modules())
    assert count_parameters(net) == count_parameters(build_generator("resnet_6blocks", ngf=8))


def test_patchgan_output_is_30x30_at_256_and_14x14_at_128():
    D = default_net("D", "basic")
    with torch.no_grad():
        assert D(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        assert D(torch.randn(1, 3, 128, 128)).shape == (1, 1, 14, 14)
        assert default_net("D", "pixel")(torch.randn(1, 3, 16, 16)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize("arch,size", [("resnet_9blocks", 64), ("resnet_6blocks", 44), ("unet_256", 256),
                                       ("unet_128", 128)])
def test_generator_output_has_the_input_shape_and_lies_in_range(arch, size):
    G = default_net("G", arch)
    with torch.no_grad():
        y = G(torch.randn(1, 3, size, size))
    assert y.shape == (1, 3, size, size)
    assert y.abs().max() <= 1.0 and y.std() > 0


@pytest.mark.parametrize("kind,arch,kwargs,size", [
    ("G", "resnet_9blocks", {}, 32),  # A reference-size file: ~45 MB.
    ("G", "unet_128", {"ngf": 8, "norm": "batch"}, 128),  # Buffers travel too.
    ("D", "basic", {"norm": "none"}, 64),
    ("D", "pixel", {}, 16),
])
def test_saved_state_dict_loads_strictly_and_gives_identical_outputs(tmp_path, kind, arch, kwargs, size):
    torch.manual_seed(1)
    net = build(kind, arch, **kwargs)
    torch.save(net.state_dict(), tmp_path / "latest_net_G_A.pth")
    torch.manual_seed(2)
    fresh = build(kind, arch, **kwargs)
    assert not torch.equal(next(fresh.parameters()), next(net.parameters()))
    fresh.load_state_dict(torch.load(tmp_path / "latest_net_G_A.pth", weights_only=True), strict=True)
    net.eval()
    fresh.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))


@pytest.mark.parametrize("norm", NORMS)
def test_norms_buffers_and_the_references_bias_rule(norm):
    G = build_generator("resnet_6blocks", ngf=8, norm=norm, norm_groups=4)
    D = build_discriminator("basic", ndf=8, norm=norm, norm_groups=4)
    has_buffers = norm == "batch"  # InstanceNorm keeps no running statistics.
    assert bool(list(G.buffers())) == has_buffers and bool(list(D.buffers())) == has_buffers
    # Convolutions in front of a norm are biased only for instance norm (off for 'none', as in the reference).
    assert (G.model[1].bias is not None) == (norm == "instance")
    assert (G.model[10].conv_block[5].bias is not None) == (norm == "instance")
    assert (D.model[2].bias is not None) == (norm == "instance")
    # Layers followed by no norm are always biased.
    assert G.model[23].bias is not None and D.model[0].bias is not None and D.model[11].bias is not None
    norms = [m for m in G.modules() if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d, nn.GroupNorm))]
    assert len(norms) == {"instance": 17, "batch": 17, "none": 0, "group": 17, "layer": 17}[norm]
    if norm in ("group", "layer"):
        assert {m.num_groups for m in norms} == {4 if norm == "group" else 1} and all(m.affine for m in norms)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norms_have_the_batch_norm_layout_without_its_buffers(norm):
    """Same keys and parameter count as norm=batch (the reference's affine norm), no running statistics."""
    for build, kwargs in ((build_generator, {"arch": "resnet_9blocks", "ngf": 8}),
                          (build_generator, {"arch": "unet_128", "ngf": 8}),
                          (build_discriminator, {"arch": "basic", "ndf": 8}),
                          (build_discriminator, {"arch": "pixel", "ndf": 8})):
        ours, batch = build(**kwargs, norm=norm, norm_groups=4), build(**kwargs, norm="batch")
        statistics = ("running_mean", "running_var", "num_batches_tracked")
        assert set(ours.state_dict()) == {k for k in batch.state_dict() if not k.endswith(statistics)}
        assert count_parameters(ours) == count_parameters(batch)
    with pytest.raises(ValueError, match="model.norm_groups=32"):
        build_generator("resnet_6blocks", ngf=8, norm="group")  # 8 channels do not split into 32 groups.


@pytest.mark.parametrize("padding,pad_type,convs", [("reflect", nn.ReflectionPad2d, (1, 5)),
                                                    ("replicate", nn.ReplicationPad2d, (1, 5)), ("zero", None, (0, 3))])
def test_block_padding_has_the_references_layout(padding, pad_type, convs):
    """The reference's padding_type: a padding layer before each 3x3 block convolution, or (zero) the
    convolution's own padding, which moves the block's keys down (conv_block.0, conv_block.4)."""
    G = build_generator("resnet_9blocks", ngf=8, padding=padding)
    block = G.model[10]
    keys = {k for k in block.state_dict() if k.endswith("weight")}
    assert keys == {f"conv_block.{i}.weight" for i in convs}
    pads = [m for m in block.modules() if isinstance(m, (nn.ReflectionPad2d, nn.ReplicationPad2d))]
    assert [type(m) for m in pads] == ([pad_type, pad_type] if pad_type else [])
    assert count_parameters(G) == count_parameters(build_generator("resnet_9blocks", ngf=8))
    x = torch.rand(1, 3, 36, 44) * 2 - 1
    assert G(x).shape == x.shape
    if padding != "reflect":
        with pytest.raises(ValueError, match="applies to the resnet generators"):
            build_generator("unet_128", ngf=8, padding=padding)


def test_instance_norm_has_no_affine_parameters_and_batch_norm_tracks_statistics():
    inorm = next(m for m in build_generator("resnet_6blocks", ngf=8).modules()
                 if isinstance(m, nn.InstanceNorm2d))
    assert not inorm.affine and not inorm.track_running_stats
    bnorm = next(m for m in build_generator("resnet_6blocks", ngf=8, norm="batch").modules()
                 if isinstance(m, nn.BatchNorm2d))
    assert bnorm.affine and bnorm.track_running_stats


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_init_types_draw_the_references_distributions(init_type):
    torch.manual_seed(0)
    D = build_discriminator("basic", init_type=init_type)
    w = D.model[8].weight.detach()  # (512, 256, 4, 4): fan_in 4096, fan_out 8192; 2 M values.
    fan_in, fan_out = 256 * 16, 512 * 16
    expected_std = {
        "normal": 0.02,
        "xavier": 0.02 * math.sqrt(2.0 / (fan_in + fan_out)),
        "kaiming": math.sqrt(2.0 / fan_in),  # The reference ignores the gain here.
        "orthogonal": 0.02 / math.sqrt(fan_in),
    }[init_type]
    assert w.std().item() == pytest.approx(expected_std, rel=0.01)
    assert abs(w.mean().item()) < 0.01 * expected_std
    if init_type == "orthogonal":
        rows = w.flatten(1)
        assert torch.allclose(rows @ rows.T, 0.02**2 * torch.eye(512), atol=1e-6)
    assert all(D.model[i].bias.abs().sum() == 0 for i in (0, 2, 5, 8, 11))
    # BatchNorm weights are N(1, gain), biases 0; every generator builds with every init.
    G = build_generator("resnet_6blocks", ngf=8, norm="batch", init_type=init_type)
    bn = G.model[2]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.03) and bn.bias.abs().sum() == 0
    net = build_generator("unet_128", ngf=8, init_type=init_type)
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()


def test_init_is_reproducible_from_torchs_global_seed():
    def snapshot(seed):
        torch.manual_seed(seed)
        return build_generator("resnet_6blocks", ngf=8).state_dict()

    a, b, c = snapshot(1), snapshot(1), snapshot(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.1.weight"], c["model.1.weight"])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    G = build_generator("resnet_6blocks", ngf=4)
    D = build_discriminator("basic", ndf=4)
    D(G(torch.randn(2, 3, 32, 32))).square().mean().backward()
    for net in (G, D):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("fn,kwargs,bad", [
    (build_generator, {"arch": "resnet_7blocks"}, "resnet_7blocks"),
    (build_discriminator, {"arch": "patch"}, "patch"),
    (build_generator, {"arch": "resnet_9blocks", "norm": "spectral"}, "spectral"),
    (build_discriminator, {"arch": "basic", "norm": "weight"}, "weight"),
    (build_generator, {"arch": "resnet_9blocks", "padding": "circular"}, "circular"),
    (build_generator, {"arch": "unet_256", "init_type": "uniform"}, "uniform"),
    (build_discriminator, {"arch": "pixel", "init_type": "he"}, "he"),
])
def test_unknown_choices_raise_value_error_naming_them(fn, kwargs, bad):
    with pytest.raises(ValueError, match=f"'{bad}'") as info:
        fn(**kwargs)
    valid = {"arch": GENERATOR_ARCHS if fn is build_generator else DISCRIMINATOR_ARCHS, "norm": NORMS,
             "padding": PADDINGS, "init_type": INIT_TYPES}[next(k for k, v in kwargs.items() if v == bad)]
    assert all(choice in str(info.value) for choice in valid)


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


@pytest.mark.parametrize("arch", ["resnet_6blocks", "unet_128"])
def test_group_kernel_instance_norm_is_instance_norm_within_rounding(arch):
    """The faster kernel keeps every key and computes the same statistics: float64 outputs and gradients agree."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        ref = build_generator(arch, ngf=4)
        fast = copy.deepcopy(ref)
        use_group_kernel_instance_norm(fast)
        x = torch.rand(2, 3, 128, 128) * 2 - 1
        out_ref, out_fast = ref(x), fast(x)
        out_ref.square().mean().backward()
        out_fast.square().mean().backward()
    finally:
        torch.set_default_dtype(torch.float32)
    swapped = [m for m in fast.modules() if isinstance(m, GroupKernelInstanceNorm2d)]
    assert swapped and not [m for m in fast.modules() if type(m) is nn.InstanceNorm2d]
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert torch.allclose(out_fast, out_ref, rtol=0, atol=1e-12)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("arch", sorted(GENERATORS))
def test_each_generator_takes_its_listed_size_multiple_and_no_finer_one(arch):
    # pipeline.config.GENERATORS is the one list that config validation, the builder and padded inference read:
    # a side of twice the listed multiple translates to its own size (once, a resnet's 1x1 bottleneck has no
    # instance statistics); half a multiple more does not.
    from pipeline.infer.generators import required_multiple

    multiple = GENERATORS[arch]
    assert required_multiple(arch) == multiple and arch in GENERATOR_ARCHS
    net = build_generator(arch, ngf=1).eval()
    with torch.no_grad():
        side = 2 * multiple
        assert net(torch.zeros(1, 3, side, side)).shape == (1, 3, side, side)
        side += multiple // 2
        try:
            out = net(torch.zeros(1, 3, side, side))
        except RuntimeError:
            return  # unet: the skip connection's shapes disagree
        assert out.shape[-1] != side


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (3, 3, 3, 3), (0, 2, 1, 0), (2, 0, 0, 3)])
def test_sliced_reflection_pad_equals_reflection_pad_and_its_gradient(pad):
    from pipeline.gan.networks import SlicedReflectionPad2d

    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    native, sliced = nn.ReflectionPad2d(pad)(x), SlicedReflectionPad2d(pad)(x)
    assert torch.equal(native, sliced)  # Copies only: bit for bit.
    g = torch.randn_like(native)
    # The backward adds the same terms in another order (corners reflect twice): rounding only.
    assert torch.allclose(torch.autograd.grad(native, x, g)[0], torch.autograd.grad(sliced, x, g)[0], atol=1e-6)


def test_perf_deterministic_swaps_every_reflection_pad_and_keeps_the_keys():
    from pipeline.config import load_config
    from pipeline.engine.dist import DistInfo
    from pipeline.gan.networks import SlicedReflectionPad2d
    from pipeline.train.build import build_components

    overrides = ["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4", "train.device=cpu"]
    plain = build_components(load_config([], overrides), DistInfo(), torch.device("cpu"))
    try:
        det = build_components(load_config([], [*overrides, "perf.deterministic=true"]), DistInfo(),
                               torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)  # Process-wide: leave other tests as they were.
    for name, net in det.nets.items():
        pads = [type(m) for m in net.modules() if isinstance(m, nn.ReflectionPad2d)]
        assert all(t is SlicedReflectionPad2d for t in pads) and (pads or name.startswith("D"))
        assert net.state_dict().keys() == plain.nets[name].state_dict().keys()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(det.gens.G_ab(x), plain.gens.G_ab(x))
