"""Evaluation split across ranks: under torchrun each rank decodes and translates its share of the held-out set,
and the gathered features and per-image scores give every rank the numbers of one process evaluating
everything."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
from support.runs import ROOT, process_env, torchrun_cmd
from support.sharded_eval import evaluate
from torch import nn

from pipeline.eval.evaluate import Share

SCRIPT = ROOT / "tests" / "support" / "sharded_eval.py"


class Thumbnail(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(images, 2).flatten(1), images.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, synthetic):
    """9 pairs (an odd count: the ranks' shares differ) at 24 px, and a feature extractor file."""
    root = tmp_path_factory.mktemp("held_out")
    synthetic.make_synthetic(root, train=0, test=9, size=24, seed=5)
    torch.jit.save(torch.jit.script(Thumbnail()), root / "thumbnail.pt")
    return root


def test_two_ranks_evaluate_half_each_and_agree_with_one_process(held_out, tmp_path):
    args = [str(held_out / "testA"), str(held_out / "testB"), str(held_out / "thumbnail.pt")]
    proc = subprocess.run(torchrun_cmd(2, str(SCRIPT), str(tmp_path), *args), env=process_env(1), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    one, translated, decoded = evaluate(*args, Share())

    # Positions 0, 2, 4, 6, 8 on rank 0 and 1, 3, 5, 7 on rank 1: each translates only its share.
    assert translated == 9 and [r["translated"] for r in ranks] == [5, 4]
    # And decodes only its share of each set (its sources, and targets that are its real share and its sources'
    # ground truth: the same positions here): 10 + 8 files, the 18 of one process, instead of 18 on each rank.
    assert decoded == 18 and [r["decoded"] for r in ranks] == [10, 8]
    assert ranks[0]["result"] == ranks[1]["result"]  # Every rank gets the whole set's result.
    got = ranks[0]["result"]
    assert got.keys() == one.keys() and got["images"] == got["real_images"] == got["pairs"] == 9
    assert set(got) >= {"fid", "kid", "l1", "psnr", "ssim", "l1_identity", "cycle_l1"}
    # The same rows in the same order reach the metrics; only a forward pass's batch composition differs (3
    # images per batch of 9 vs of 5 and 4), which may move the last bits of a convolution.
    assert got == pytest.approx(one, rel=1e-6, abs=1e-9)
