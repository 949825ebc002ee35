"""Generators and discriminators of CycleGAN, module for module as the reference implementation.

The module tree (and so every state_dict key and shape) equals junyanz/pytorch-CycleGAN-and-pix2pix
`models/networks.py`, so its `latest_net_G_A.pth` files load here with `load_state_dict(strict=True)`. That is
why the attribute names (`model`, `conv_block`, `net`) and the placement of parameter-free layers (padding,
activations, identity norms) are kept: they fix the indices in the keys. Plain modules: no distributed code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import init

GENERATOR_ARCHS = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128")
DISCRIMINATOR_ARCHS = ("basic", "n_layers", "pixel")
NORMS = ("instance", "batch", "none")
INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")

NormFactory = Callable[[int], nn.Module]


def _choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} '{value}'; choose one of: {', '.join(choices)}")


def norm_factory(norm: str) -> tuple[NormFactory, bool]:
    """The norm layer constructor and whether convolutions in front of it carry a bias (the reference's rule).

    InstanceNorm without affine parameters and without running statistics, as in the reference: the networks
    then have no buffers, and a conv bias in front of it is on (its true gradient is zero). The reference turns
    the bias off for `none`, a quirk kept so that such files load.
    """
    _choice("norm", norm, NORMS)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False), True
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True), False
    return (lambda channels: nn.Identity()), False


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """Conv/Linear weights from `init_type` (biases 0); BatchNorm weights N(1, gain). Uses torch's global RNG."""
    _choice("init type", init_type, INIT_TYPES)

    def init_module(m: nn.Module) -> None:
        name = type(m).__name__
        if hasattr(m, "weight") and ("Conv" in name or "Linear" in name):
            if init_type == "normal":
                init.normal_(m.weight.data, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(m.weight.data, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(m.weight.data, a=0, mode="fan_in")
            else:
                init.orthogonal_(m.weight.data, gain=init_gain)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)
        elif "BatchNorm2d" in name:
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    return net.apply(init_module)


class ResnetBlock(nn.Module):
    """x + conv_block(x): two reflection-padded 3x3 convolutions (Johnson et al.)."""

    def __init__(self, dim: int, norm: NormFactory, use_bias: bool, use_dropout: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, padding=0, bias=use_bias), norm(dim), nn.ReLU(True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, padding=0, bias=use_bias), norm(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, two stride-2 downsamplings, `n_blocks` residual blocks, two upsamplings, c7s1-3, tanh."""

    def __init__(self, in_channels: int, out_channels: int, ngf: int, norm: str, use_dropout: bool,
                 n_blocks: int) -> None:
        super().__init__()
        norm_layer, use_bias = norm_factory(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, padding=0, bias=use_bias), norm_layer(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                norm_layer(ngf * mult * 2), nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4, norm_layer, use_bias, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                   bias=use_bias),
                norm_layer(ngf * mult // 2), nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class UnetSkipConnectionBlock(nn.Module):
    """One level of the U-Net: down, the inner levels, up, and the skip concatenation (pix2pix)."""

    def __init__(self, outer_nc: int, inner_nc: int, norm: NormFactory, use_bias: bool, in_channels: int | None = None,
                 submodule: nn.Module | None = None, outermost: bool = False, innermost: bool = False,
                 use_dropout: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        in_channels = outer_nc if in_channels is None else in_channels
        downconv = nn.Conv2d(in_channels, inner_nc, 4, stride=2, padding=1, bias=use_bias)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            layers = [downconv, submodule, nn.ReLU(True), upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            layers = [nn.LeakyReLU(0.2, True), downconv, nn.ReLU(True), upconv, norm(outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            layers = [nn.LeakyReLU(0.2, True), downconv, norm(inner_nc), submodule, nn.ReLU(True), upconv,
                      norm(outer_nc)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """The pix2pix U-Net with `num_downs` downsamplings (8 for 256x256 inputs, 7 for 128x128)."""

    def __init__(self, in_channels: int, out_channels: int, num_downs: int, ngf: int, norm: str,
                 use_dropout: bool) -> None:
        super().__init__()
        norm_layer, use_bias = norm_factory(norm)
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer, use_bias, innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer, use_bias, submodule=block,
                                            use_dropout=use_dropout)
        for outer, inner in ((ngf * 4, ngf * 8), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = UnetSkipConnectionBlock(outer, inner, norm_layer, use_bias, submodule=block)
        self.model = UnetSkipConnectionBlock(out_channels, ngf, norm_layer, use_bias, in_channels=in_channels,
                                             submodule=block, outermost=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `n_layers` stride-2 4x4 convolutions, one stride-1, then a 1-channel map (70x70 at n=3)."""

    def __init__(self, in_channels: int, ndf: int, n_layers: int, norm: str) -> None:
        super().__init__()
        norm_layer, use_bias = norm_factory(norm)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=use_bias),
                       norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=use_bias),
                   norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN: judges each pixel's colour alone."""

    def __init__(self, in_channels: int, ndf: int, norm: str) -> None:
        super().__init__()
        norm_layer, use_bias = norm_factory(norm)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 1, bias=use_bias), norm_layer(ndf * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 1, bias=use_bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_generator(arch: str, ngf: int = 64, norm: str = "instance", init_type: str = "normal",
                    init_gain: float = 0.02, use_dropout: bool = False, in_channels: int = 3,
                    out_channels: int = 3) -> nn.Module:
    """A generator of the reference: resnet_9blocks, resnet_6blocks, unet_256 or unet_128, initialised."""
    _choice("generator", arch, GENERATOR_ARCHS)
    if arch.startswith("resnet"):
        net: nn.Module = ResnetGenerator(in_channels, out_channels, ngf, norm, use_dropout,
                                         n_blocks=9 if arch == "resnet_9blocks" else 6)
    else:
        net = UnetGenerator(in_channels, out_channels, 8 if arch == "unet_256" else 7, ngf, norm, use_dropout)
    return init_weights(net, init_type, init_gain)


def build_discriminator(arch: str, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                        init_type: str = "normal", init_gain: float = 0.02, in_channels: int = 3) -> nn.Module:
    """A discriminator of the reference: basic (70x70 PatchGAN), n_layers (`n_layers` deep) or pixel."""
    _choice("discriminator", arch, DISCRIMINATOR_ARCHS)
    if arch == "pixel":
        net: nn.Module = PixelDiscriminator(in_channels, ndf, norm)
    else:
        net = NLayerDiscriminator(in_channels, ndf, 3 if arch == "basic" else n_layers, norm)
    return init_weights(net, init_type, init_gain)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
