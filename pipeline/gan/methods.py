"""The training methods side by side: which networks each has, which of them translates which direction, and
the one builder of a config's translating generator (used by training, translation, evaluation and export)."""

from __future__ import annotations

from torch import nn

from pipeline.gan.cut.model import generator_of
from pipeline.gan.networks import generator_from

# Per method: direction -> the generator's name (in checkpoints, and as an attribute of the generators module).
DIRECTIONS: dict[str, dict[str, str]] = {
    "cyclegan": {"AtoB": "G_ab", "BtoA": "G_ba"},
    "cut": {"AtoB": "G"},
    "fastcut": {"AtoB": "G"},
}


def translator_from(model_cfg, direction: str = "AtoB") -> nn.Module:
    """The generator `model_cfg` trains (`model.method`) for `direction`: CycleGAN's, or CUT's antialiased
    ResNet (A to B only)."""
    if model_cfg.method == "cyclegan":
        return generator_from(model_cfg, *(("a", "b") if direction == "AtoB" else ("b", "a")))
    return generator_of(model_cfg)
