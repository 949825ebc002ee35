"""The reference implementation's ResNet generator (junyanz/pytorch-CycleGAN-and-pix2pix, models/networks.py:
ResnetGenerator and ResnetBlock with instance norm and reflection padding), transcribed with its layer order and
names, for checks that our networks load its files strictly: here with any input_nc and output_nc."""

from __future__ import annotations

import functools

from torch import nn


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm_layer, use_bias: bool) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias), norm_layer(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias), norm_layer(dim),
        )

    def forward(self, x):
        return x + self.conv_block(x)


class ReferenceResnetGenerator(nn.Module):
    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        norm_layer = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
        use_bias = True  # norm_layer.func == nn.InstanceNorm2d in the reference.
        model = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
                 norm_layer(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2**i
            model += [nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                      norm_layer(ngf * mult * 2), nn.ReLU(True)]
        mult = 4
        model += [ResnetBlock(ngf * mult, norm_layer, use_bias) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [nn.ConvTranspose2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=2, padding=1,
                                         output_padding=1, bias=use_bias),
                      norm_layer(int(ngf * mult / 2)), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)
