"""Exact tiled translation: a generator run layer by layer over an image of any size, each layer tile by tile.

InstanceNorm normalises with the statistics of the whole image, so translating tiles independently gives seams
and colour shifts. Here the activations of the image live in host memory, a layer's input and output at a time
(plus the skips the architecture keeps: a residual block's input, a U-Net level's input). Every convolution runs
on the device one output tile at a time, reading the input window its kernel needs (the halo, padding included:
at the image's borders the layer's reflection or zero padding, inside it the neighbouring pixels), and every
norm layer reduces its statistics over all tiles before normalising any. The result is the untiled forward
pass's up to the order of summation (float rounding), with device memory bounded by one tile's window.

A dry run over "meta" tensors (shapes only) counts the tiles first, so a progress bar can show the total.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ConfigError
from pipeline.gan.colour import ColourGenerator, combine
from pipeline.gan.cut.networks import CUTGenerator, Downsample, Upsample
from pipeline.gan.networks import ResnetBlock, ResnetGenerator, UnetGenerator, UnetSkipConnectionBlock

_PADS = (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d, nn.ConstantPad2d)
_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout)


class TileError(ConfigError):
    """A network that tiled translation cannot run exactly."""


def _pad_mode(module: nn.Module) -> str:
    if isinstance(module, nn.ReflectionPad2d):
        return "reflect"
    if isinstance(module, nn.ReplicationPad2d):
        return "replicate"
    if isinstance(module, nn.ConstantPad2d) and module.value != 0:
        raise TileError(f"--tile: constant padding by {module.value} is not supported; translate without --tile")
    return "zeros"


def _source_index(start: int, stop: int, size: int, before: int, mode: str) -> tuple[Tensor, Tensor | None]:
    """Rows [start, stop) of an axis of `size` padded by `before` in front: their source rows in the unpadded
    axis, and for zero padding a mask of the rows that exist (None when all do)."""
    q = torch.arange(start - before, stop - before)
    if mode == "reflect":
        q = q.abs()
        q = torch.where(q >= size, 2 * (size - 1) - q, q)
        return q, None
    inside = (q >= 0) & (q < size)
    q = q.clamp(0, size - 1)
    return q, (None if mode == "replicate" or bool(inside.all()) else inside)


def _grid(height: int, width: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            yield top, min(top + tile, height), left, min(left + tile, width)


class TiledForward:
    """Runs a generator over (N, C, H, W) host tensors layer by layer, with at most `tile` x `tile` output
    positions of a layer on `device` at a time.

    Supports the module types of our and the reference's generators (ResNet and U-Net, and CUT's antialiased
    ResNet: convolutions, transposed convolutions, blur-pool down- and upsampling, padding, InstanceNorm /
    GroupNorm / BatchNorm in eval mode, pointwise activations, residual and skip connections); anything else is
    a TileError naming it.
    """

    def __init__(self, tile: int, device: torch.device, precision_dtype: torch.dtype | None = None,
                 on_tile: Callable[[int], None] | None = None) -> None:
        if tile < 1:
            raise TileError(f"--tile must be a positive number of pixels, got {tile}")
        self.tile, self.device, self.dtype, self.on_tile = tile, device, precision_dtype, on_tile
        self.tiles = 0

    # Entry points.

    def count_tiles(self, net: nn.Module, shape: tuple[int, ...]) -> int:
        """How many tile operations translating an input of `shape` takes (a shapes-only dry run)."""
        self.tiles, on_tile, self.on_tile = 0, self.on_tile, None
        try:
            self._run(net, torch.empty(shape, device="meta"), owned=True)
        finally:
            self.on_tile = on_tile
        return self.tiles

    @torch.no_grad()
    def __call__(self, net: nn.Module, x: Tensor) -> Tensor:
        if net.training:
            raise TileError("tiled translation runs generators in eval mode (net.eval())")
        self.tiles = 0
        return self._run(net, x.detach().to("cpu", torch.float32).clone(), owned=True)

    # The module tree.

    def _run(self, module: nn.Module, x: Tensor, owned: bool) -> Tensor:
        """`module(x)`; `owned`: x is referenced nowhere else, so it may be overwritten."""
        if isinstance(module, (ResnetGenerator, UnetGenerator, CUTGenerator)):
            return self._run(module.model, x, owned)
        if isinstance(module, ColourGenerator):
            body = self._run(module.body, x, owned=False)
            colour = self._run(module.colour, x, owned=False)
            return self._pointwise(body, lambda t, part: combine(module.skip(x[part].to(t.device)), t,
                                                                 colour[part].to(t.device)), owned=True)
        if isinstance(module, Downsample):  # Blur-pool: reflection pad 1, depthwise 3x3 filter at stride 2.
            return self._conv2d(x, module.filt, None, (2, 2), (1, 1), module.channels, (1, 1, 1, 1), "reflect")
        if isinstance(module, Upsample):
            # Replication pad 1, depthwise transposed 4x4 at stride 2 and padding 2, one pixel cropped on each
            # side: the cropping is one more row of the transposed convolution's padding (3).
            padded = self._run(module.pad, x, owned)
            return self._conv_transpose2d(padded, module.filt, None, (2, 2), (3, 3), (0, 0), (1, 1), module.channels)
        if isinstance(module, nn.Sequential):
            return self._sequence(list(module), x, owned)
        if isinstance(module, ResnetBlock):
            out = self._run(module.conv_block, x, owned=False)
            return self._pointwise(out, lambda t, part: t.add_(x[part].to(t.device)), owned=True)
        if isinstance(module, UnetSkipConnectionBlock):
            # Not owned: the skip concatenates x. The level's LeakyReLU(inplace) still changes x first, as it
            # does in the reference's forward (the skip carries the activated input there too).
            out = self._run(module.model, x, owned=False)
            return out if module.outermost else torch.cat([x, out], 1)
        if isinstance(module, nn.Conv2d):
            return self._conv(module, x, None)
        if isinstance(module, nn.ConvTranspose2d):
            return self._conv_transpose(module, x)
        if isinstance(module, _PADS):
            left, right, top, bottom = module.padding
            if x.is_meta:
                return torch.empty((*x.shape[:2], x.shape[2] + top + bottom, x.shape[3] + left + right),
                                   device="meta")
            mode = {"zeros": "constant"}.get(_pad_mode(module), _pad_mode(module))
            return F.pad(x, (left, right, top, bottom), mode=mode)
        if isinstance(module, (nn.InstanceNorm2d, nn.GroupNorm, nn.BatchNorm2d)):
            return self._norm(module, x, owned)
        if isinstance(module, _POINTWISE):
            if isinstance(module, (nn.Identity, nn.Dropout)):
                return x
            in_place = owned or getattr(module, "inplace", False)
            return self._pointwise(x, lambda t, part: module(t), owned=in_place)
        raise TileError(f"--tile: a {type(module).__name__} layer cannot be run tile by tile (supported: ResNet "
                        "and U-Net generators); translate without --tile")

    def _sequence(self, layers: list[nn.Module], x: Tensor, owned: bool) -> Tensor:
        i = 0
        while i < len(layers):
            layer = layers[i]
            if (isinstance(layer, _PADS) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.Conv2d)
                    and layers[i + 1].padding in ((0, 0), 0)):
                # The padding is read inside each tile's window: no padded copy of the activation.
                x, i = self._conv(layers[i + 1], x, layer), i + 2
            else:
                x, i = self._run(layer, x, owned), i + 1
            owned = True
        return x

    # Tile-by-tile operations.

    def _step(self, n: int = 1) -> None:
        self.tiles += n
        if self.on_tile is not None:
            self.on_tile(n)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _conv(self, conv: nn.Conv2d, x: Tensor, pad: nn.Module | None) -> Tensor:
        if pad is not None:
            left, right, top, bottom = pad.padding
            mode = _pad_mode(pad)
        else:
            if isinstance(conv.padding, str):
                raise TileError(f"--tile: convolution padding '{conv.padding}' is not supported")
            (top, left), mode = conv.padding, {"zeros": "zeros", "reflect": "reflect",
                                               "replicate": "replicate"}.get(conv.padding_mode, "circular")
            bottom, right = top, left
            if mode == "circular":
                raise TileError("--tile: circular padding is not supported; translate without --tile")
        return self._conv2d(x, conv.weight, conv.bias, conv.stride, conv.dilation, conv.groups,
                            (left, right, top, bottom), mode)

    def _conv2d(self, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                dilation: tuple[int, int], groups: int, pads: tuple[int, int, int, int], mode: str) -> Tensor:
        """F.conv2d of x padded by pads (left, right, top, bottom) in `mode`, one output tile at a time."""
        (kh, kw), (sh, sw), (dh, dw) = weight.shape[-2:], stride, dilation
        left, right, top, bottom = pads
        n, _, h, w = x.shape
        oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
        out = torch.empty((n, weight.shape[0], oh, ow), device="meta" if x.is_meta else "cpu")
        for o0, o1, p0, p1 in _grid(oh, ow, self.tile):
            self._step()
            if x.is_meta:
                continue
            rows, row_mask = _source_index(o0 * sh, (o1 - 1) * sh + dh * (kh - 1) + 1, h, top, mode)
            cols, col_mask = _source_index(p0 * sw, (p1 - 1) * sw + dw * (kw - 1) + 1, w, left, mode)
            window = x.index_select(2, rows).index_select(3, cols).to(self.device)
            if row_mask is not None:
                window *= row_mask.to(self.device).view(1, 1, -1, 1)
            if col_mask is not None:
                window *= col_mask.to(self.device).view(1, 1, 1, -1)
            with self._autocast():
                y = F.conv2d(window, weight, bias, (sh, sw), 0, (dh, dw), groups)
            out[:, :, o0:o1, p0:p1] = y.float().cpu()
        return out

    def _conv_transpose(self, conv: nn.ConvTranspose2d, x: Tensor) -> Tensor:
        return self._conv_transpose2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.output_padding,
                                      conv.dilation, conv.groups)

    def _conv_transpose2d(self, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                          padding: tuple[int, int], output_padding: tuple[int, int], dilation: tuple[int, int],
                          groups: int) -> Tensor:
        """F.conv_transpose2d one output tile at a time, each from the inputs that reach it."""
        (kh, kw), (sh, sw), (dh, dw) = weight.shape[-2:], stride, dilation
        (ph, pw), (eh, ew) = padding, output_padding
        n, _, h, w = x.shape
        oh = (h - 1) * sh - 2 * ph + dh * (kh - 1) + eh + 1
        ow = (w - 1) * sw - 2 * pw + dw * (kw - 1) + ew + 1
        out_channels = weight.shape[1] * groups
        out = torch.empty((n, out_channels, oh, ow), device="meta" if x.is_meta else "cpu")
        for o0, o1, p0, p1 in _grid(oh, ow, self.tile):
            self._step()
            if x.is_meta:
                continue
            # Output o = i * stride - padding + k * dilation: the inputs that reach [o0, o1).
            i0, i1 = max(0, math.ceil((o0 + ph - dh * (kh - 1)) / sh)), min(h - 1, (o1 - 1 + ph) // sh)
            j0, j1 = max(0, math.ceil((p0 + pw - dw * (kw - 1)) / sw)), min(w - 1, (p1 - 1 + pw) // sw)
            tile = torch.zeros((n, out_channels, o1 - o0, p1 - p0), device=self.device)
            if bias is not None:
                tile += bias.float().view(1, -1, 1, 1)
            if i0 <= i1 and j0 <= j1:
                window = x[:, :, i0 : i1 + 1, j0 : j1 + 1].to(self.device)
                with self._autocast():
                    raw = F.conv_transpose2d(window, weight, bias, (sh, sw), 0, 0, groups, (dh, dw))
                # raw[r] is output i0 * stride - padding + r; it may end before o1 (output_padding rows
                # that no input reaches hold the bias alone).
                r0, c0 = o0 - (i0 * sh - ph), p0 - (j0 * sw - pw)
                r1, c1 = min(raw.shape[2], r0 + o1 - o0), min(raw.shape[3], c0 + p1 - p0)
                tile[:, :, : r1 - r0, : c1 - c0] = raw[:, :, r0:r1, c0:c1].float()
            out[:, :, o0:o1, p0:p1] = tile.cpu()
        return out

    def _pointwise(self, x: Tensor, fn: Callable[[Tensor, tuple], Tensor], owned: bool) -> Tensor:
        """fn(tile, index) over every tile of x, into x itself when owned (else into a new tensor)."""
        out = x if owned or x.is_meta else torch.empty_like(x)
        for o0, o1, p0, p1 in _grid(x.shape[2], x.shape[3], self.tile):
            self._step()
            if x.is_meta:
                continue
            part = (slice(None), slice(None), slice(o0, o1), slice(p0, p1))
            out[part] = fn(x[part].to(self.device), part).cpu()
        return out

    def _norm(self, norm: nn.Module, x: Tensor, owned: bool) -> Tensor:
        n, c = x.shape[:2]
        groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else c
        running = getattr(norm, "track_running_stats", False) and norm.running_mean is not None
        if isinstance(norm, nn.BatchNorm2d) and not running:
            raise TileError("--tile: BatchNorm without running statistics is not supported")
        if running:
            mean = norm.running_mean.double().view(1, c).expand(n, c)
            var = norm.running_var.double().view(1, c).expand(n, c)
        else:
            mean, var = self._statistics(x, groups)
        if x.is_meta:
            return self._pointwise(x, lambda t, part: t, owned)
        rstd = (var + norm.eps).rsqrt()
        scale, shift = rstd, -mean * rstd
        if getattr(norm, "weight", None) is not None:
            weight, bias = norm.weight.double().view(1, c), norm.bias.double().view(1, c)
            scale, shift = scale * weight, shift * weight + bias
        scale = scale.float().to(self.device).view(n, c, 1, 1)
        shift = shift.float().to(self.device).view(n, c, 1, 1)
        return self._pointwise(x, lambda t, part: torch.addcmul(shift, t, scale), owned)

    def _statistics(self, x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """Per-(sample, channel) mean and biased variance over all positions (and the channels of a group),
        reduced over tiles in float64: a first pass for the mean, a second for the squared deviations."""
        n, c, h, w = x.shape
        if x.is_meta:
            self._step(2 * len(list(_grid(h, w, self.tile))))
            return torch.zeros(n, c, dtype=torch.float64), torch.ones(n, c, dtype=torch.float64)
        count = h * w * (c // groups)

        def per_group(values: Tensor) -> Tensor:
            return values.view(n, groups, c // groups).sum(-1, keepdim=True).expand(n, groups, c // groups)

        sums = torch.zeros(n, c, dtype=torch.float64, device=self.device)
        for o0, o1, p0, p1 in _grid(h, w, self.tile):
            self._step()
            sums += x[:, :, o0:o1, p0:p1].to(self.device).double().sum((2, 3))
        mean = (per_group(sums) / count).reshape(n, c)
        squares = torch.zeros(n, c, dtype=torch.float64, device=self.device)
        for o0, o1, p0, p1 in _grid(h, w, self.tile):
            self._step()
            tile = x[:, :, o0:o1, p0:p1].to(self.device).double()
            squares += (tile - mean.view(n, c, 1, 1)).square().sum((2, 3))
        var = (per_group(squares) / count).reshape(n, c)
        return mean.cpu(), var.cpu()
