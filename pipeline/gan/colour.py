"""Networks that see absolute colour and intensity: variants of the paper's generators and discriminators.

The paper's ResNet generator starts with a bias-free convolution followed by instance norm, which removes any
per-channel offset of its input exactly and a global scale nearly so: G(x + c) = G(x), G(0.7 x) ~ G(x). It cannot
see a colour cast or an exposure, so it cannot learn a colour grade, a white balance, a stain normalisation or an
intensity mapping. Its PatchGAN discriminator sees offsets (its first layer has a bias and no norm) but hardly an
exposure change (the instance norms after it take the scale out).

- `colour` generator: G(x) = tanh(atanh(x) + body(x) + colour(x)). `body` is the paper's generator without its
  final tanh, `colour` a per-pixel network (1x1 convolutions) of the raw input. The skip in tanh's logit space
  carries the input's absolute values through, `colour` can map them (any global per-pixel transform: exposure,
  cast, gamma, channel mix), and `body` adds what depends on the image's structure. Both branches' last layers
  start at zero, so G starts as the identity, as a colour task's answer is near it.
- `colour_start=transfer`: the skip carries a fixed affine colour map, x -> W x + b, fitted before training as the
  linear colour transfer from the source domain's pixel statistics to the target's (`colour_transfer`). G then
  starts as the classical answer to a global colour mapping, and the branches learn what it misses (what depends
  on the image's content or is not affine). Unpaired, like the rest of the objective: it uses each domain's pixel
  mean and covariance only. It assumes the domains differ in colour, not in what they show: for horses and
  zebras, or a B with more sky than A, the transfer would carry the content's colour difference too.
- `spectral` discriminator: the same PatchGAN with spectral normalisation (Miyato et al. 2018) on every
  convolution instead of instance norm, so that scores depend on absolute intensities; spectral norm bounds D's
  Lipschitz constant, which keeps it from winning outright the way an unnormalised D would.
- `colour` discriminator: the `spectral` PatchGAN plus a score from the image's colour statistics (its channel
  means, their covariance and each channel's quantiles), added to every patch's. A global colour mapping changes
  exactly these; a patch discriminator has to infer them from content it sees a few times, the statistics head
  reads them off.

The `reference` settings keep the paper's networks, unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

G_VARIANTS = ("reference", "colour")
D_VARIANTS = ("reference", "spectral", "colour")
G_STARTS = ("identity", "transfer")


class ColourTransfer(nn.Module):
    """A fixed affine map of each pixel's channels, x -> W x + b (buffers, not parameters: it is fitted once from
    the data by `colour_transfer` and checkpointed with the network, never trained). Starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.eye(channels))
        self.register_buffer("bias", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # In float32 whatever autocast says: in bf16, 0.999 rounds to 1, where combine's atanh is infinite (and its
        # gradient NaN); the identity start hands combine the float32 input too.
        if torch.jit.is_scripting():  # An exported network runs without autocast (and scripts none).
            return self._map(x)
        return self._map_in_float32(x)

    @torch.jit.unused
    def _map_in_float32(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self._map(x)

    def _map(self, x: Tensor) -> Tensor:
        weight, bias = self.weight.to(x.device), self.bias.to(x.device)
        return torch.nn.functional.conv2d(x.float(), weight[:, :, None, None], bias)

    @torch.no_grad()
    def set(self, weight: Tensor, bias: Tensor) -> None:
        self.weight.copy_(weight)
        self.bias.copy_(bias)


def colour_transfer(source_mean: Tensor, source_cov: Tensor, target_mean: Tensor,
                    target_cov: Tensor) -> tuple[Tensor, Tensor]:
    """The linear Monge-Kantorovich colour transfer (Pitie and Kokaram 2007): the affine map x -> W x + b that
    carries pixels of mean `source_mean` and covariance `source_cov` to `target_mean` and `target_cov`, moving them
    as little as possible. W = S^-1/2 (S^1/2 T S^1/2)^1/2 S^-1/2 for covariances S (source) and T (target); one
    channel: the ratio of the spreads. Directions in which the source does not vary, or hardly (under `FLAT` of
    its main variance: a grey domain seen in RGB), are mapped to the target's mean. Computed in float64; returns
    (W, b) as float32."""
    source_cov, target_cov = source_cov.double(), target_cov.double()
    root = _psd_power(source_cov, 0.5)
    inverse_root = _psd_power(source_cov, -0.5)
    weight = inverse_root @ _psd_power(root @ target_cov @ root, 0.5) @ inverse_root
    bias = target_mean.double() - weight @ source_mean.double()
    return weight.float(), bias.float()


# Directions in which a domain varies less than this share of its main direction's variance (a spread under 1%
# of it: the chroma of a grey set stored as JPEG colour) count as not varying. Inverting them would multiply
# compression noise by a hundred or more.
FLAT = 1e-4


def _psd_power(matrix: Tensor, power: float) -> Tensor:
    """A symmetric positive semi-definite matrix to a power, through its eigenvalues. For a negative power,
    eigenvalues under FLAT of the largest are not inverted but become 0 (the pseudo-inverse's convention)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    values = values.clamp(min=0)
    if power >= 0:
        return (vectors * values**power) @ vectors.T
    kept = values > FLAT * values.max().clamp(min=1e-300)
    scaled = torch.where(kept, values.clamp(min=1e-300) ** power, torch.zeros_like(values))
    return (vectors * scaled) @ vectors.T


class ColourGenerator(nn.Module):
    """tanh(atanh(skip(x)) + body(x) + colour(x)); see the module's docstring.

    Args:
        body: a generator whose last module is its output `nn.Tanh` (it is replaced by an identity here) and whose
            last convolution makes the output (it is set to zero).
        in_channels, out_channels: the image channels (the skip needs them equal).
        width: channels of the per-pixel colour network.
        start: "identity" (the skip carries x) or "transfer" (a `ColourTransfer`, set from the data before
            training by `start_from`).
    """

    def __init__(self, body: nn.Module, in_channels: int = 3, out_channels: int = 3, width: int = 32,
                 start: str = "identity") -> None:
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(f"the colour generator's skip needs as many output channels as input ({in_channels}), "
                             f"got {out_channels}")
        _drop_last_tanh(body)
        _zero(_last_conv(body))
        self.body = body
        self.colour = nn.Sequential(
            nn.Conv2d(in_channels, width, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, width, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, out_channels, 1),
        )
        _zero(self.colour[-1])
        _check(start, G_STARTS, "model.colour_start")
        # The identity start keeps no module at all: its numbers and checkpoints are those of before the option.
        self.skip = ColourTransfer(in_channels) if start == "transfer" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return combine(self.skip(x), self.body(x), self.colour(x))

    def start_from(self, weight: Tensor, bias: Tensor) -> None:
        """Set the skip's colour map (`colour_transfer`'s W and b); only a generator built with start=transfer
        has one."""
        if not isinstance(self.skip, ColourTransfer):
            raise ValueError("this colour generator was built with start=identity: it has no colour map to set")
        self.skip.set(weight, bias)

    # CUT's generator is also its PatchNCE encoder: its layers stay reachable through the body.
    def encode(self, x: Tensor, layers: list[int]) -> list[Tensor]:
        return self.body.encode(x, layers)

    def feature_widths(self, layers: list[int]) -> list[int]:
        return self.body.feature_widths(layers)


def combine(x: Tensor, body: Tensor, colour: Tensor) -> Tensor:
    """The colour generator's output from its skip's output `x` and its two branches (also used tile by tile).
    atanh of a pixel at the ends of [-1, 1] is infinite: values are held 1e-3 inside (a fifth of an 8-bit level)."""
    return torch.tanh(torch.atanh(x.clamp(-0.999, 0.999)) + body + colour)


def _children(net: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) of every submodule of `net`, in module order: what replacing one in place needs."""
    return [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()]


def _drop_last_tanh(net: nn.Module) -> None:
    found = [(parent, name) for parent, name, child in _children(net) if isinstance(child, nn.Tanh)]
    if not found:
        raise ValueError(f"{type(net).__name__} has no output tanh to take the colour skip's place")
    parent, name = found[-1]
    setattr(parent, name, nn.Identity())


def _last_conv(net: nn.Module) -> nn.Module:
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    return convs[-1]


@torch.no_grad()
def _zero(layer: nn.Module) -> None:
    layer.weight.zero_()
    if layer.bias is not None:
        layer.bias.zero_()


def colour_generator(body: nn.Module, variant: str, in_channels: int = 3, out_channels: int = 3,
                     start: str = "identity") -> nn.Module:
    """`body` as the `variant` generator asks ("reference": unchanged), starting as `start` says (colour only)."""
    _check(variant, G_VARIANTS, "model.g_variant")
    return body if variant == "reference" else ColourGenerator(body, in_channels, out_channels, start=start)


class StatisticsHead(nn.Module):
    """A score from an image's colour statistics, through a small spectrally normalised MLP: its channel means, the
    covariance of its channels (spreads, and how channels move together: what an exposure, a cast or a channel mix
    changes) and five quantiles of each channel (its tone curve: what a gamma or a film look changes, which two
    moments cannot tell apart; with them a gamma's held-out L1 at 800 steps fell from 0.29 to 0.15)."""

    QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        self.channels = channels
        features = channels + channels * (channels + 1) // 2 + channels * len(self.QUANTILES)
        self.mlp = nn.Sequential(spectral_norm(nn.Linear(features, width)), nn.LeakyReLU(0.2, True),
                                 spectral_norm(nn.Linear(width, 1)))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean((2, 3))
        pixels = x.flatten(2)
        centred = pixels - mean[:, :, None]
        covariance = centred @ centred.transpose(1, 2) / centred.shape[-1]
        rows, cols = torch.triu_indices(self.channels, self.channels, device=x.device)
        # A stable sort keeps the gradient of tied values on the same pixel on every device and rank.
        ordered = pixels.sort(dim=-1, stable=True).values
        at = [round(q * (ordered.shape[-1] - 1)) for q in self.QUANTILES]
        return self.mlp(torch.cat([mean, covariance[:, rows, cols], ordered[:, :, at].flatten(1)], 1))


class StatisticsDiscriminator(nn.Module):
    """A patch discriminator whose every score also holds the image's colour-statistics score."""

    def __init__(self, patches: nn.Module, channels: int) -> None:
        super().__init__()
        self.patches = patches
        self.statistics = StatisticsHead(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.patches(x) + self.statistics(x)[:, :, None, None]


def colour_discriminator(net: nn.Module, variant: str, channels: int = 3) -> nn.Module:
    """`net` (built without norm layers for `spectral` and `colour`) as the `variant` discriminator asks."""
    _check(variant, D_VARIANTS, "model.d_variant")
    if variant in ("spectral", "colour"):
        for parent, name, child in _children(net):
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, spectral_norm(child))
    if variant == "colour":
        return StatisticsDiscriminator(net, channels)
    return net


def discriminator_norm(variant: str, norm: str) -> str:
    """The norm a `variant` discriminator is built with: spectral normalisation replaces the norm layers."""
    return "none" if variant in ("spectral", "colour") else norm


def _check(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: choose one of {', '.join(choices)}")
