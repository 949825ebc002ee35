"""CycleGAN generators and discriminators with the reference implementation's exact module tree.

Every class here mirrors one of junyanz/pytorch-CycleGAN-and-pix2pix `models/networks.py`, module for module:
the attribute names (`model`, `conv_block`, `net`) and the position of every layer, parameter-free ones
included (padding, activations, `Identity` norms), fix the state_dict keys, so the reference's
`latest_net_G_A.pth` files load here with `load_state_dict(strict=True)`. Layers are also constructed and
initialised in the reference's order, so the same `torch.manual_seed` gives the same initial weights.

Plain modules and builders only: no distributed code, no logging, no config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from pipeline.config import GENERATORS
from pipeline.gan.colour import colour_discriminator, colour_generator, discriminator_norm

GENERATOR_ARCHS = tuple(GENERATORS)
DISCRIMINATOR_ARCHS = ("basic", "n_layers", "pixel")
NORMS = ("instance", "batch", "none", "group", "layer")
PADDINGS = ("reflect", "replicate", "zero")
INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")

NormLayer = Callable[[int], nn.Module]
"""Builds the norm layer for a number of channels."""

_RESNET_BLOCKS = {"resnet_9blocks": 9, "resnet_6blocks": 6}
_UNET_DOWNSAMPLINGS = {"unet_256": 8, "unet_128": 7}


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def _norm_layer(norm: str, groups: int = 32) -> tuple[NormLayer, bool]:
    """The norm layer factory for `norm` and whether the convolutions in front of it carry a bias.

    The reference turns the bias on exactly when the norm is InstanceNorm (without affine parameters it has no
    shift of its own); it is off for `batch` (BatchNorm's shift replaces it) and, as a quirk of its
    `use_bias = norm_layer == InstanceNorm2d` test, also off for `none`. We keep that quirk so files trained
    with `--norm none` load. InstanceNorm keeps no running statistics, so instance-norm nets have no buffers.
    `group` (GroupNorm with `groups` groups) and `layer` (GroupNorm with one group: statistics over channels
    and positions of each sample) are ours, not the reference's: affine, so without a bias in front, like batch.
    """
    _check_choice("norm", norm, NORMS)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False), True
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True), False
    if norm in ("group", "layer"):
        count = groups if norm == "group" else 1

        def grouped(channels: int) -> nn.Module:
            if channels % count:
                raise ValueError(f"model.norm=group: {channels} channels do not split into model.norm_groups="
                                 f"{count} groups; choose a divisor of the networks' widths (ngf, ndf and their "
                                 "multiples)")
            return nn.GroupNorm(count, channels, affine=True)

        return grouped, False
    # A parameter-free placeholder keeps the layer indices (and so the keys) of the normalised variants.
    return (lambda channels: nn.Identity()), False


def _padding_layers(padding: str) -> tuple[list[nn.Module], int]:
    """The reference's `padding_type` of a residual block's 3x3 convolution: a padding layer in front of it
    (reflect, replicate), or the convolution's own zero padding (zero: one layer fewer, so other keys)."""
    _check_choice("padding", padding, PADDINGS)
    if padding == "reflect":
        return [nn.ReflectionPad2d(1)], 0
    if padding == "replicate":
        return [nn.ReplicationPad2d(1)], 0
    return [], 1


class GroupKernelInstanceNorm2d(nn.InstanceNorm2d):
    """`nn.InstanceNorm2d(affine=False)` computed by GroupNorm's kernel with one channel per group.

    The same statistics (per sample and channel, biased variance, the same eps), so the maths is unchanged and
    outputs differ by rounding only (~1e-6). GroupNorm's fused kernels skip instance_norm's batch_norm over a
    reshaped view: on CPU its forward + backward (with the in-place ReLU that follows it) is 1.7-2.8x faster at
    CycleGAN's activation sizes, and its output is a fresh tensor, so that in-place ReLU needs no copy-back.
    No parameters or buffers: state_dict keys are those of the module it replaces.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, x.shape[1], None, None, self.eps)


def uses_group_kernel_norm(kernel: str, device: torch.device) -> bool:
    """`perf.instance_norm_kernel` resolved for a device: auto takes GroupNorm's kernel where it was measured
    faster (CPU) and keeps torch's InstanceNorm kernel on CUDA, where no comparison has been run yet.

    Training and inference (translate, evaluate) resolve it the same way, so a number computed during training
    and again from its checkpoint is the same computation, not the same maths rounded differently.
    """
    return kernel == "group_norm" or (kernel == "auto" and device.type == "cpu")


def use_group_kernel_instance_norm(net: nn.Module) -> nn.Module:
    """Replace, in place, every parameter-free InstanceNorm2d of `net` by `GroupKernelInstanceNorm2d`."""
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.InstanceNorm2d and not child.affine and not child.track_running_stats:
                setattr(parent, name, GroupKernelInstanceNorm2d(child.num_features, eps=child.eps))
    return net


class SlicedReflectionPad2d(nn.ReflectionPad2d):
    """`nn.ReflectionPad2d` built from slices, flips and concatenations: the same output bit for bit, and a
    backward whose gradient terms autograd adds in a fixed order. torch's CUDA backward of reflection padding
    adds with atomics, so deterministic mode refuses it. No parameters: state_dict keys are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        left, right, top, bottom = self.padding
        x = torch.cat([x[..., 1:left + 1].flip(-1), x, x[..., x.shape[-1] - right - 1:-1].flip(-1)], dim=-1)
        return torch.cat([x[..., 1:top + 1, :].flip(-2), x, x[..., x.shape[-2] - bottom - 1:-1, :].flip(-2)],
                         dim=-2)


def use_sliced_reflection_pad(net: nn.Module) -> nn.Module:
    """Replace, in place, every `nn.ReflectionPad2d` of `net` by `SlicedReflectionPad2d` (perf.deterministic)."""
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReflectionPad2d:
                setattr(parent, name, SlicedReflectionPad2d(child.padding))
    return net


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """Initialise `net` in place as the reference does and return it.

    Conv and Linear weights are drawn by `init_type` (normal: N(0, gain); xavier: xavier_normal with gain;
    kaiming: kaiming_normal fan_in, gain unused; orthogonal: scaled by gain) and their biases set to 0;
    BatchNorm2d weights are drawn from N(1, gain), biases 0. Draws come from torch's global RNG, module by
    module in `nn.Module.apply` order, so `torch.manual_seed` makes them reproducible.

    Args:
        net: the network to initialise.
        init_type: one of `INIT_TYPES`.
        init_gain: standard deviation (normal) or gain (xavier, orthogonal).
    """
    _check_choice("init type", init_type, INIT_TYPES)

    def init_module(m: nn.Module) -> None:
        # Matching on the class name, as the reference does, covers Conv{1,2,3}d, ConvTranspose* and Linear.
        name = type(m).__name__
        if hasattr(m, "weight") and ("Conv" in name or "Linear" in name):
            if init_type == "normal":
                init.normal_(m.weight, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(m.weight, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                init.orthogonal_(m.weight, gain=init_gain)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias, 0.0)
        elif "BatchNorm2d" in name:
            init.normal_(m.weight, 1.0, init_gain)
            init.constant_(m.bias, 0.0)

    return net.apply(init_module)


class ResnetBlock(nn.Module):
    """`x + conv_block(x)`: two padded 3x3 convolutions at constant width (Johnson et al.).

    Reflection padding (the default) instead of zero padding avoids border artefacts in the translated image.
    """

    def __init__(self, dim: int, norm_layer: NormLayer, use_bias: bool, use_dropout: bool,
                 padding: str = "reflect") -> None:
        super().__init__()
        pads, p = _padding_layers(padding)
        layers: list[nn.Module] = [
            *pads,
            nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias),
            norm_layer(dim),
            nn.ReLU(True),
        ]
        if use_dropout:
            # As in the reference, this shifts the second convolution's key from conv_block.5 to conv_block.6.
            layers.append(nn.Dropout(0.5))
        layers += [
            *_padding_layers(padding)[0],
            nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias),
            norm_layer(dim),
        ]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, two stride-2 3x3 downsamplings, `n_blocks` residual blocks at ngf*4, two transposed-conv
    upsamplings, c7s1-out, tanh. Accepts any input whose height and width are divisible by 4.

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        ngf: filters of the first convolution; the bottleneck has 4 * ngf.
        norm: one of `NORMS`.
        use_dropout: dropout 0.5 inside each residual block (off for CycleGAN).
        n_blocks: residual blocks (9 for 256x256 training, 6 for 128x128).
    """

    def __init__(self, in_channels: int, out_channels: int, ngf: int = 64, norm: str = "instance",
                 use_dropout: bool = False, n_blocks: int = 9, padding: str = "reflect",
                 norm_groups: int = 32) -> None:
        super().__init__()
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        norm_layer, use_bias = _norm_layer(norm, norm_groups)
        n_downsampling = 2
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, kernel_size=7, padding=0, bias=use_bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        for i in range(n_downsampling):
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                norm_layer(ngf * mult * 2),
                nn.ReLU(True),
            ]
        mult = 2**n_downsampling
        layers += [ResnetBlock(ngf * mult, norm_layer, use_bias, use_dropout, padding) for _ in range(n_blocks)]
        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            layers += [
                # output_padding=1 makes each upsampling exactly double the size, undoing a downsampling.
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1,
                                   output_padding=1, bias=use_bias),
                norm_layer(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [
            nn.ReflectionPad2d(3),
            nn.Conv2d(ngf, out_channels, kernel_size=7, padding=0),  # Always biased: no norm follows.
            nn.Tanh(),  # Images live in [-1, 1].
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class UnetSkipConnectionBlock(nn.Module):
    """One level of the pix2pix U-Net: downsample, the inner levels (`submodule`), upsample, and concatenate
    the level's input to its output (the skip), except at the outermost level, which returns the image.

    The norm after the outermost downsampling and after the innermost one are left out, as in the reference;
    the innermost output is 1x1, where InstanceNorm is undefined.
    """

    def __init__(self, outer_nc: int, inner_nc: int, norm_layer: NormLayer, use_bias: bool,
                 input_nc: int | None = None, submodule: nn.Module | None = None, outermost: bool = False,
                 innermost: bool = False, use_dropout: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        layers: list[nn.Module]
        if outermost:
            assert submodule is not None
            # Always biased: tanh, not a norm, follows it.
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            layers = [downconv, submodule, nn.ReLU(True), upconv, nn.Tanh()]
        elif innermost:
            # No submodule, so no concatenation below: the up path sees inner_nc channels, not 2 * inner_nc.
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            layers = [nn.LeakyReLU(0.2, True), downconv, nn.ReLU(True), upconv, norm_layer(outer_nc)]
        else:
            assert submodule is not None
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1,
                                        bias=use_bias)
            layers = [nn.LeakyReLU(0.2, True), downconv, norm_layer(inner_nc), submodule,
                      nn.ReLU(True), upconv, norm_layer(outer_nc)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """The pix2pix U-Net with `num_downs` stride-2 levels, built from the innermost level outwards.

    Input height and width must be divisible by 2**num_downs: 256 for num_downs=8 (`unet_256`), 128 for 7
    (`unet_128`); the bottleneck is then 1x1. The nesting makes the keys `model.model.1.model.3....`.

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        num_downs: number of downsamplings (>= 5).
        ngf: filters of the outermost level; inner levels have up to 8 * ngf.
        norm: one of `NORMS`.
        use_dropout: dropout 0.5 in the innermost ngf*8 levels (pix2pix's noise source; off for CycleGAN).
    """

    def __init__(self, in_channels: int, out_channels: int, num_downs: int, ngf: int = 64,
                 norm: str = "instance", use_dropout: bool = False, norm_groups: int = 32) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        norm_layer, use_bias = _norm_layer(norm, norm_groups)
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer, use_bias, innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer, use_bias, submodule=block,
                                            use_dropout=use_dropout)
        for outer_nc, inner_nc in ((ngf * 4, ngf * 8), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = UnetSkipConnectionBlock(outer_nc, inner_nc, norm_layer, use_bias, submodule=block)
        self.model = UnetSkipConnectionBlock(out_channels, ngf, norm_layer, use_bias, input_nc=in_channels,
                                             submodule=block, outermost=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convolutions, `n_layers` of them stride 2, one stride 1 and a 1-channel output conv.

    Each output value judges one input patch (70x70 for n_layers=3), so D scores texture and style locally;
    the output map is 30x30 for a 256x256 input. No norm after the first convolution, as in the reference.

    Args:
        in_channels: channels of the judged image.
        ndf: filters of the first convolution; later ones have up to 8 * ndf.
        n_layers: stride-2 convolutions.
        norm: one of `NORMS`.
    """

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                 norm_groups: int = 32) -> None:
        super().__init__()
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}")
        norm_layer, use_bias = _norm_layer(norm, norm_groups)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev_mult, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev_mult, ndf * mult, kernel_size=4, stride=2, padding=1, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev_mult, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev_mult, ndf * mult, kernel_size=4, stride=1, padding=1, bias=use_bias),
            norm_layer(ndf * mult),
            nn.LeakyReLU(0.2, True),
            # Raw scores: the loss applies any sigmoid.
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN: judges each pixel's colour on its own; the output map has the input's size.

    Unlike NLayerDiscriminator, the reference gives its last convolution `bias=use_bias`, and names the
    sequence `net`; both are kept.
    """

    def __init__(self, in_channels: int, ndf: int = 64, norm: str = "instance", norm_groups: int = 32) -> None:
        super().__init__()
        norm_layer, use_bias = _norm_layer(norm, norm_groups)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ndf, kernel_size=1, stride=1, padding=0),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, kernel_size=1, stride=1, padding=0, bias=use_bias),
            norm_layer(ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, kernel_size=1, stride=1, padding=0, bias=use_bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_generator(arch: str, ngf: int = 64, norm: str = "instance", init_type: str = "normal",
                    init_gain: float = 0.02, use_dropout: bool = False, in_channels: int = 3,
                    out_channels: int = 3, padding: str = "reflect", norm_groups: int = 32) -> nn.Module:
    """An initialised generator, equal in structure to the reference's `define_G` (without its GPU wrapping).

    Args:
        arch: one of `GENERATOR_ARCHS`. resnet_* take inputs whose sides are divisible by 4; unet_256 needs
            sides divisible by 256 and unet_128 by 128.
        ngf: filters of the first convolution.
        norm: one of `NORMS`.
        init_type: one of `INIT_TYPES`.
        init_gain: see `init_weights`.
        use_dropout: dropout 0.5 as in the reference (off for CycleGAN).
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        padding: one of `PADDINGS`, the residual blocks' padding (the reference's `padding_type`); resnet only.
        norm_groups: groups of `norm="group"`.

    Raises:
        ValueError: for an unknown arch, norm, padding or init_type, before anything is built.
    """
    _check_choice("generator arch", arch, GENERATOR_ARCHS)
    _check_choice("norm", norm, NORMS)
    _check_choice("padding", padding, PADDINGS)
    _check_choice("init type", init_type, INIT_TYPES)
    net: nn.Module
    if arch in _RESNET_BLOCKS:
        net = ResnetGenerator(in_channels, out_channels, ngf, norm, use_dropout, _RESNET_BLOCKS[arch], padding,
                              norm_groups)
    else:
        if padding != "reflect":
            raise ValueError(f"padding {padding!r} applies to the resnet generators' blocks; the U-Net has none")
        net = UnetGenerator(in_channels, out_channels, _UNET_DOWNSAMPLINGS[arch], ngf, norm, use_dropout,
                            norm_groups)
    return init_weights(net, init_type, init_gain)


def build_discriminator(arch: str, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                        init_type: str = "normal", init_gain: float = 0.02,
                        in_channels: int = 3, norm_groups: int = 32) -> nn.Module:
    """An initialised discriminator, equal in structure to the reference's `define_D`.

    Args:
        arch: one of `DISCRIMINATOR_ARCHS`: basic (70x70 PatchGAN, always 3 layers), n_layers (a PatchGAN
            with `n_layers` stride-2 layers) or pixel (1x1 PatchGAN).
        ndf: filters of the first convolution.
        n_layers: used by `n_layers` only, like the reference's `n_layers_D`.
        norm: one of `NORMS`.
        init_type: one of `INIT_TYPES`.
        init_gain: see `init_weights`.
        in_channels: channels of the judged image.
        norm_groups: groups of `norm="group"`.

    Raises:
        ValueError: for an unknown arch, norm or init_type, before anything is built.
    """
    _check_choice("discriminator arch", arch, DISCRIMINATOR_ARCHS)
    _check_choice("norm", norm, NORMS)
    _check_choice("init type", init_type, INIT_TYPES)
    net: nn.Module
    if arch == "pixel":
        net = PixelDiscriminator(in_channels, ndf, norm, norm_groups)
    else:
        net = NLayerDiscriminator(in_channels, ndf, 3 if arch == "basic" else n_layers, norm, norm_groups)
    return init_weights(net, init_type, init_gain)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter values in `module` (shared parameters once), as the reference prints it."""
    return sum(p.numel() for p in module.parameters())


def channels(model: object, domain: str) -> int:
    """Channels of a domain ("a" or "b") by a model config (model.channels_a/b; 3 for configs before them)."""
    return int(getattr(model, f"channels_{domain.lower()}", 3))


def generator_from(model: object, source: str = "a", target: str = "b") -> nn.Module:
    """`build_generator` with a model config's settings (`model.generator`, `ngf`, `norm`, `padding`, ...), as
    `model.g_variant` asks, translating domain `source`'s channels to domain `target`'s."""
    net = build_generator(model.generator, ngf=model.ngf, norm=model.norm, init_type=model.init_type,
                          init_gain=model.init_gain, padding=model.padding, norm_groups=model.norm_groups,
                          in_channels=channels(model, source), out_channels=channels(model, target))
    return colour_generator(net, getattr(model, "g_variant", "reference"), channels(model, source),
                            channels(model, target), getattr(model, "colour_start", "identity"))


def discriminator_from(model: object, domain: str = "b") -> nn.Module:
    """`build_discriminator` with a model config's settings (`model.discriminator`, `ndf`, `d_variant`, ...),
    judging images of `domain`."""
    variant = getattr(model, "d_variant", "reference")
    net = build_discriminator(model.discriminator, ndf=model.ndf, n_layers=model.n_layers_d,
                              norm=discriminator_norm(variant, model.norm), init_type=model.init_type,
                              init_gain=model.init_gain, norm_groups=model.norm_groups,
                              in_channels=channels(model, domain))
    return colour_discriminator(net, variant, channels(model, domain))
