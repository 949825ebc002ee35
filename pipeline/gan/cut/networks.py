"""The networks of CUT with the reference implementation's module trees (taesungp/contrastive-unpaired-translation
`models/networks.py`): the antialiased ResNet generator with its encoder taps, the antialiased PatchGAN, and the
PatchSampleF MLP head, built eagerly from the known feature widths.

The reference creates F's MLPs on F's first forward (for DataParallel); parameters created after the optimiser
and the DDP wrapper are never optimised or all-reduced. Here F is complete at construction, so DDP's broadcast
makes every rank's F equal before the first step. State_dict keys and parameter counts equal the reference's,
so its `latest_net_G.pth` loads with strict=True.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.gan.colour import colour_discriminator, colour_generator, discriminator_norm
from pipeline.gan.networks import ResnetBlock, _norm_layer, init_weights
from pipeline.gan.networks import channels as domain_channels


def _binomial(size: int) -> Tensor:
    """The reference's `get_filter`: the outer product of a binomial row with itself, summing to 1."""
    rows = {3: [1.0, 2.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0]}[size]
    row = torch.tensor(rows)
    filt = row[:, None] * row[None, :]
    return filt / filt.sum()


class Downsample(nn.Module):
    """Blur-pool by 2 (Zhang, ICML 2019): reflection pad 1, a fixed depthwise 3x3 binomial filter at stride 2.

    The filter is a persistent buffer `filt` (C, 1, 3, 3), as the reference saves it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.pad = nn.ReflectionPad2d(1)
        self.register_buffer("filt", _binomial(3)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.pad(x), self.filt, stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """Antialiased upsampling by 2: replication pad 1, a fixed depthwise transposed 4x4 binomial filter (times
    stride**2) at stride 2 and padding 2, and one pixel cropped on each side: exactly twice the size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.pad = nn.ReplicationPad2d(1)
        self.register_buffer("filt", (_binomial(4) * 4)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv_transpose2d(self.pad(x), self.filt, stride=2, padding=2, groups=x.shape[1])
        return out[:, :, 1:-1, 1:-1]


class CUTGenerator(nn.Module):
    """The ResNet generator of CUT: like CycleGAN's, but each stride-2 convolution is a stride-1 convolution and
    a `Downsample`, and each transposed convolution an `Upsample` and a stride-1 convolution (`antialias`,
    `antialias_up`; both off give junyanz's generator exactly). `encode(x, layers)` returns the outputs of the
    listed top-level layers, stopping after the last (the reference's `encode_only`)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, norm: str = "instance",
                 n_blocks: int = 9, padding: str = "reflect", antialias: bool = True, antialias_up: bool = True,
                 norm_groups: int = 32) -> None:
        super().__init__()
        norm_layer, use_bias = _norm_layer(norm, norm_groups)
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, padding=0, bias=use_bias),
                                   norm_layer(ngf), nn.ReLU(True)]
        for i in range(2):
            width = ngf * 2**i
            if antialias:
                layers += [nn.Conv2d(width, 2 * width, 3, stride=1, padding=1, bias=use_bias), norm_layer(2 * width),
                           nn.ReLU(True), Downsample(2 * width)]
            else:
                layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=use_bias), norm_layer(2 * width),
                           nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, norm_layer, use_bias, False, padding) for _ in range(n_blocks)]
        for i in range(2):
            width = ngf * 2 ** (2 - i)
            if antialias_up:
                layers += [Upsample(width), nn.Conv2d(width, width // 2, 3, stride=1, padding=1, bias=use_bias),
                           norm_layer(width // 2), nn.ReLU(True)]
            else:
                layers += [nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1,
                                              bias=use_bias), norm_layer(width // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def encode(self, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
        feats, last = [], max(layers)
        for index, layer in enumerate(self.model):
            x = layer(x)
            if index in layers:
                feats.append(x)
            if index == last:
                break
        return feats

    def feature_widths(self, layers: Sequence[int]) -> list[int]:
        """Channels of each encoder tap, read off the layers (what F's MLPs take)."""
        widths, channels = [], self.model[1].in_channels
        for index, layer in enumerate(self.model):
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                channels = layer.out_channels
            if index in layers:
                widths.append(channels)
            if index == max(layers):
                break
        return widths


class CUTDiscriminator(nn.Module):
    """CUT's PatchGAN: CycleGAN's with each stride-2 4x4 convolution made stride 1 and followed by a
    `Downsample` (`antialias`; off gives junyanz's discriminator)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                 antialias: bool = True, norm_groups: int = 32) -> None:
        super().__init__()
        norm_layer, use_bias = _norm_layer(norm, norm_groups)
        stride = 1 if antialias else 2
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=stride, padding=1), nn.LeakyReLU(0.2, True)]
        if antialias:
            layers.append(Downsample(ndf))
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                       norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
            if antialias:
                layers.append(Downsample(ndf * mult))
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=use_bias), norm_layer(ndf * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def l2_normalize(x: Tensor) -> Tensor:
    """Rows divided by their L2 norm plus 1e-7, as the reference's `Normalize(2)`.

    The norm is `vector_norm`, not the reference's `pow(2).sum().pow(0.5)`: the same value, but at an all-zero
    row (a patch where a narrow layer's ReLU inputs are all zero and the biases are still 0) the square root's
    gradient is inf, times 0 it is NaN, and one such patch made every weight NaN at the first update (finite
    losses, NaN gradients). vector_norm's gradient there is 0."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-7)


class PatchSampleF(nn.Module):
    """Samples the same positions of every image of a feature map and projects them through a per-layer MLP
    (Linear(C_l, width), ReLU, Linear(width, width)), then L2-normalises: the embeddings of PatchNCE.

    Keys `mlp_{l}.{0,2}.{weight,bias}`, as the reference's.
    """

    def __init__(self, widths: Sequence[int], width: int = 256) -> None:
        super().__init__()
        self.widths, self.width = list(widths), width
        for index, channels in enumerate(self.widths):
            setattr(self, f"mlp_{index}", nn.Sequential(nn.Linear(channels, width), nn.ReLU(), nn.Linear(width, width)))

    def forward(self, feats: Sequence[Tensor], num_patches: int, patch_ids: Sequence[Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """(B*P, width) embeddings per layer and the positions used: `patch_ids` when given, else P = min(
        num_patches, H*W) positions drawn without replacement (from `generator`), the same for every image."""
        out, ids = [], []
        for index, feat in enumerate(feats):
            flat = feat.permute(0, 2, 3, 1).flatten(1, 2)  # (B, HW, C)
            if patch_ids is not None:
                chosen = patch_ids[index]
            else:
                # Drawn on the CPU: the same numbers on every device (and CUDA's randperm of a large n has failed
                # before; the reference moved to NumPy for that, SPEC-CUT.md section 4).
                perm = torch.randperm(flat.shape[1], generator=generator)
                chosen = perm[: min(num_patches, flat.shape[1])].to(feat.device)
            sample = flat[:, chosen, :].flatten(0, 1)
            out.append(l2_normalize(getattr(self, f"mlp_{index}")(sample)))
            ids.append(chosen)
        return out, ids


def build_cut_generator(model_cfg, n_blocks: int) -> nn.Module:
    source, target = domain_channels(model_cfg, "a"), domain_channels(model_cfg, "b")
    net = CUTGenerator(source, target, model_cfg.ngf, model_cfg.norm, n_blocks, model_cfg.padding,
                       model_cfg.antialias, model_cfg.antialias_up, model_cfg.norm_groups)
    return colour_generator(init_weights(net, model_cfg.init_type, model_cfg.init_gain),
                            getattr(model_cfg, "g_variant", "reference"), source, target,
                            getattr(model_cfg, "colour_start", "identity"))


def build_cut_discriminator(model_cfg) -> nn.Module:
    n_layers = 3 if model_cfg.discriminator == "basic" else model_cfg.n_layers_d
    variant = getattr(model_cfg, "d_variant", "reference")
    net = CUTDiscriminator(domain_channels(model_cfg, "b"), model_cfg.ndf, n_layers,
                           discriminator_norm(variant, model_cfg.norm), model_cfg.antialias, model_cfg.norm_groups)
    return colour_discriminator(init_weights(net, model_cfg.init_type, model_cfg.init_gain), variant,
                                domain_channels(model_cfg, "b"))


def build_patch_sampler(widths: Sequence[int], width: int, init_type: str, init_gain: float) -> PatchSampleF:
    return init_weights(PatchSampleF(widths, width), init_type, init_gain)
