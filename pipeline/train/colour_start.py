"""model.colour_start=transfer: each colour generator starts as the linear colour transfer between the domains.

Fitted once at the start of a run, from the pixel statistics of `model.colour_start_images` images of each
domain, before the networks are copied for the average and wrapped for DDP. A resumed run, or one initialised from
a checkpoint, takes the fitted map from the checkpoint instead (it is a buffer of the generator).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from torch import nn

from pipeline.data.moments import PixelMoments, pixel_moments
from pipeline.data.pixels import formats_from
from pipeline.data.stream import Augment
from pipeline.gan.colour import ColourGenerator, colour_transfer

log = logging.getLogger("pipeline.train")


def domain_moments(cfg: DictConfig, urls: dict[str, list[str]]) -> dict[str, PixelMoments]:
    """Domain ("A", "B") -> its pixel moments over images decoded and cropped as training's are (`urls`: the
    domains' shards, as training expanded them)."""
    if cfg.model.method == "cyclegan" and cfg.loss.lambda_idt > 0:
        log.warning("model.colour_start=transfer with loss.lambda_idt=%s: the identity loss asks G_ab(b) = b, "
                    "while the generators start as a colour map that changes b; configs/colour.yaml sets "
                    "loss.lambda_idt=0", cfg.loss.lambda_idt)
    data = cfg.data
    augment = Augment(data.preprocess, data.load_size, data.crop_size, data.flip)
    formats = formats_from(cfg)
    return {domain: pixel_moments(urls[domain], augment, formats[domain], cfg.model.colour_start_images,
                                  f"domain {domain} ({data[f'train_{domain.lower()}']})", data.remote_retry_s)
            for domain in ("A", "B")}


def start_from_transfer(gens: nn.Module, directions: dict[str, str], moments: dict[str, PixelMoments]) -> None:
    """Set each colour generator's skip to the colour transfer from its source domain to its target.

    Args:
        gens: the method's generators module.
        directions: direction ("AtoB", "BtoA") -> the attribute of `gens` that translates it (`DIRECTIONS`).
        moments: domain ("A", "B") -> its pixel moments.
    """
    for direction, name in directions.items():
        net, (source, target) = getattr(gens, name), direction.split("to")
        if not isinstance(net, ColourGenerator):
            raise TypeError(f"{name} is a {type(net).__name__}; model.colour_start=transfer needs "
                            "model.g_variant=colour")
        s, t = moments[source], moments[target]
        weight, bias = colour_transfer(s.mean, s.covariance, t.mean, t.covariance)
        net.start_from(weight, bias)
        log.info("%s starts as the colour transfer %s -> %s (pixel statistics of %d and %d images): "
                 "W = %s, b = %s", name, source, target, s.images, t.images,
                 [[round(v, 4) for v in row] for row in weight.tolist()], [round(v, 4) for v in bias.tolist()])
