"""One direction's held-out evaluation under torchrun, every rank with its share; each rank writes a JSON file.

Usage: torchrun --standalone --nproc_per_node=N tests/support/sharded_eval.py OUT_DIR SOURCE TARGET FEATURES
Each rank writes OUT_DIR/rank-R.json: the images its generators translated, the image files it decoded and the
(gathered) result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data import held_out
from pipeline.engine import dist
from pipeline.eval.evaluate import Share, evaluate_direction
from pipeline.eval.metrics.features import load_extractor
from pipeline.gan.networks import generator_from

SETTINGS = ["model.generator=resnet_6blocks", "model.ngf=8"]


def generators() -> tuple[nn.Module, nn.Module]:
    """A fixed pair of small untrained generators (the same in every process that calls this)."""
    cfg = load_config([], SETTINGS)
    torch.manual_seed(0)
    return generator_from(cfg.model), generator_from(cfg.model)


class Counting(nn.Module):
    """A generator that counts the images it translates."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.net(x)


def evaluate(source: str, target: str, features: str, share: Share) -> tuple[dict[str, float], int, int]:
    """The result, the images this process translated and the image files it decoded."""
    g_ab, g_ba = generators()
    net = Counting(g_ab)
    decoded, open_rgb = [0], held_out._open_rgb

    def counting_open(path: Path):
        decoded[0] += 1
        return open_rgb(path)

    held_out._open_rgb = counting_open  # The one place a held-out file is decoded.
    try:
        result = evaluate_direction(net, g_ba, 4, source, target, torch.device("cpu"), load_extractor(features),
                                    paired_keys=True, batch_size=3, kid_subsets=10, kid_subset_size=4, share=share)
    finally:
        held_out._open_rgb = open_rgb
    return result, net.images, decoded[0]


def main(argv: list[str]) -> int:
    out, source, target, features = argv
    info = dist.read_env()
    dist.init_process_group(info, torch.device("cpu"))
    result, translated, decoded = evaluate(source, target, features, Share.of_process_group())
    Path(out, f"rank-{info.rank}.json").write_text(json.dumps({"translated": translated, "result": result,
                                                               "decoded": decoded}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
