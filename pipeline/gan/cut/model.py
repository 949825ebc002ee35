"""The CUT model: the generator G and patch sampler F in one module (one DDP wrapper, one forward per step),
the discriminator D, and the objective (SPEC-CUT.md section 1).

G runs 3 times in a step (5 with identity NCE) before the one backward pass: on x (and y) to translate, then
its encoder on the output for the queries and on the input for the keys. All of that happens inside
`CUTGenerators.forward`, so DDP sees one forward and one backward per step, with every parameter of G and F
used (F's only through the queries: the keys are detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import GENERATORS
from pipeline.data.images import project_channels
from pipeline.gan.cut.networks import (
    CUTGenerator,
    build_cut_discriminator,
    build_cut_generator,
    build_patch_sampler,
)
from pipeline.gan.cut.patchnce import patch_nce
from pipeline.gan.losses import GANLoss
from pipeline.gan.networks import channels, use_group_kernel_instance_norm

_BLOCKS = {"resnet_9blocks": 9, "resnet_6blocks": 6}


def parse_layers(text: str) -> list[int]:
    return [int(part) for part in str(text).split(",") if part.strip()]


@dataclass(frozen=True)
class CUTObjective:
    """Weights and settings of CUT's objective: lambda_GAN * GAN + NCE terms (each times lambda_NCE; with
    identity NCE the two NCE terms are averaged)."""

    gan: GANLoss
    lambda_gan: float = 1.0
    lambda_nce: float = 1.0
    nce_idt: bool = True
    layers: tuple[int, ...] = (0, 4, 8, 12, 16)
    num_patches: int = 256
    temperature: float = 0.07
    flip_equivariance: bool = False


class PatchSampling:
    """This rank's draws of CUT (flip or not, patch positions): a generator of its own, seeded per rank and
    saved with the rank's state, so a resumed run draws what the straight run drew."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def flip(self) -> bool:
        return bool(torch.rand((), generator=self.generator) < 0.5)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class CUTGenerators(nn.Module):
    """G and F. `forward` translates and computes the NCE terms; `G` alone is what translation uses."""

    def __init__(self, G: CUTGenerator, F: nn.Module, objective: CUTObjective, channels_a: int = 3,
                 channels_b: int = 3) -> None:
        super().__init__()
        self.G, self.F = G, F
        self.objective = objective
        self.channels_a, self.channels_b = channels_a, channels_b

    def as_source(self, x: Tensor) -> Tensor:
        """B images as G's encoder takes A's (`project_channels`): unchanged for equal channel counts; else B's
        luminance for a 1-channel A, or a 1-channel B repeated. PatchNCE then compares the structure of input and
        output (colourisation: the output's luminance with the input)."""
        return project_channels(x, self.channels_a)

    def nce(self, source: Tensor, output: Tensor, flipped: bool, sampling: PatchSampling) -> Tensor:
        """NCE(src, out) of the reference's `calculate_NCE_loss`: queries from the output, keys from the input
        at the same positions; the mean over rows, times lambda_NCE, averaged over the layers."""
        obj = self.objective
        feat_q = self.G.encode(self.as_source(output), obj.layers)
        if flipped:
            feat_q = [torch.flip(f, [3]) for f in feat_q]
        feat_k = self.G.encode(source, obj.layers)
        keys, ids = self.F(feat_k, obj.num_patches, None, sampling.generator)
        queries, _ = self.F(feat_q, obj.num_patches, ids)
        total = sum((patch_nce(q, k, source.shape[0], obj.temperature) * obj.lambda_nce).mean()
                    for q, k in zip(queries, keys))
        return total / len(obj.layers)

    def forward(self, real_a: Tensor, real_b: Tensor, sampling: PatchSampling) -> dict[str, Tensor]:
        obj = self.objective
        if obj.nce_idt:
            real_b = self.as_source(real_b)
        real = torch.cat([real_a, real_b]) if obj.nce_idt else real_a
        flipped = obj.flip_equivariance and sampling.flip()
        if flipped:
            real = torch.flip(real, [3])
        fake = self.G(real)
        out = {"fake_b": fake[: real_a.shape[0]]}
        if obj.nce_idt:
            out["idt_b"] = fake[real_a.shape[0]:]
        if obj.lambda_nce > 0:
            out["nce"] = self.nce(real_a, out["fake_b"], flipped, sampling)
            if obj.nce_idt:
                out["nce_idt"] = self.nce(real_b, out["idt_b"], flipped, sampling)
        return out


def generator_of(model_cfg) -> CUTGenerator:
    if model_cfg.generator not in _BLOCKS:
        raise ValueError(f"model.method={model_cfg.method} trains a ResNet generator: model.generator is "
                         f"'{model_cfg.generator}'; choose one of {', '.join(_BLOCKS)} (of {', '.join(GENERATORS)})")
    return build_cut_generator(model_cfg, _BLOCKS[model_cfg.generator])


def build_cut_networks(model_cfg, cut_cfg, objective: CUTObjective,
                       group_kernel_norm: bool = False) -> tuple[CUTGenerators, nn.Module]:
    """G + F and D of a config, initialised from torch's global RNG (G, then D, then F: F's widths come from
    G's layers, so F is complete before any DDP wrapper or optimiser sees it)."""
    G = generator_of(model_cfg)
    D = build_cut_discriminator(model_cfg)
    F = build_patch_sampler(G.feature_widths(objective.layers), cut_cfg.mlp_width, model_cfg.init_type,
                            model_cfg.init_gain)
    if group_kernel_norm:
        for net in (G, D):
            use_group_kernel_instance_norm(net)
    return CUTGenerators(G, F, objective, channels(model_cfg, "a"), channels(model_cfg, "b")), D


def build_cut_objective(loss_cfg, cut_cfg) -> CUTObjective:
    layers = tuple(parse_layers(cut_cfg.nce_layers))
    return CUTObjective(GANLoss(loss_cfg.gan_mode), cut_cfg.lambda_gan, cut_cfg.lambda_nce, cut_cfg.nce_idt, layers,
                        cut_cfg.num_patches, cut_cfg.nce_t, cut_cfg.flip_equivariance)


__all__ = ["CUTGenerators", "CUTObjective", "PatchSampling", "build_cut_networks", "build_cut_objective",
           "generator_of", "parse_layers"]
