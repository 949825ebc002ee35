"""Exact tiled translation (`pipeline.translate --tile`): layer by layer, convolutions tile by tile with their
halos, norm statistics over the whole image. The output must equal untiled translation within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_translate import random_image, write_checkpoint
from torch import nn

from pipeline.data.images import to_tensor
from pipeline.engine.progress import Progress
from pipeline.infer.generators import PaddedGenerator, load_generators
from pipeline.infer.tiled import TiledForward, TileError
from pipeline.infer.translate import translate_tiled
from pipeline.translate import main

CPU = torch.device("cpu")
# A large init gain: outputs that vary across the image (the default 0.02 gives nearly flat ones), so that a
# wrong halo or a per-tile statistic would show.
LIVELY = ["model.init_gain=0.3"]
MODELS = {
    "resnet": ["model.generator=resnet_6blocks", "model.ngf=4"],
    "resnet-group-zero": ["model.generator=resnet_6blocks", "model.ngf=4", "model.norm=group", "model.norm_groups=2",
                          "model.padding=zero"],
    "resnet-batch-replicate": ["model.generator=resnet_6blocks", "model.ngf=4", "model.norm=batch",
                               "model.padding=replicate"],
    "unet": ["model.generator=unet_128", "model.ngf=4"],
}


def untiled(net: nn.Module, x: torch.Tensor, multiple: int) -> torch.Tensor:
    with torch.no_grad():
        return PaddedGenerator(net, multiple)(x[None])[0]


def tiled(net: nn.Module, x: torch.Tensor, multiple: int, tile: int, precision: str = "fp32") -> torch.Tensor:
    return next(translate_tiled(net, multiple, [("x", x)], CPU, tile, precision))[1]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("source", ["checkpoint", "reference"])
def test_tiled_equals_untiled_on_a_non_square_image_not_a_multiple_of_the_tile(tmp_path, model, source):
    nets = write_checkpoint(tmp_path / "ckpt-000000005.pt", [*MODELS[model], *LIVELY])
    if source == "reference":
        torch.save(nets["G_ab"].state_dict(), tmp_path / "latest_net_G_A.pth")
        # GroupNorm is ours, not the reference's: its keys read as BatchNorm's, so the setting is given.
        extra = ["model.norm=group", "model.norm_groups=2"] if "group" in model else []
        gens = load_generators(tmp_path / "latest_net_G_A.pth", "AtoB", extra)
    else:
        gens = load_generators(tmp_path / "ckpt-000000005.pt", "AtoB")
    assert gens.source == source
    net = gens.to(CPU).net.eval()
    # 150 x 97: padded to the generator's multiple (4, or 128 for unet_128: 256 x 128), then cut into 24 px
    # tiles, which divide none of the layers' sizes.
    x = torch.rand(3, 97, 150, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = untiled(net, x, gens.multiple)
    got = tiled(net, x, gens.multiple, tile=24)
    assert got.shape == want.shape == (3, 97, 150)
    assert want.std() > 0.1  # A translation with structure, not a flat image.
    assert (got - want).abs().max() < 1e-4


def test_naive_tiles_would_differ(tmp_path):
    """What the exact path avoids: tiles translated on their own get their own norm statistics (seams)."""
    nets = write_checkpoint(tmp_path / "ckpt-000000005.pt", [*MODELS["resnet"], *LIVELY])
    net = nets["G_ab"].eval()
    x = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    want = untiled(net, x, 4)
    naive = torch.cat([torch.cat([untiled(net, x[:, r:r + 48, c:c + 48], 4) for c in (0, 48)], 2) for r in (0, 48)],
                      1)
    assert (naive - want).abs().max() > 0.05
    assert (tiled(net, x, 4, tile=16) - want).abs().max() < 1e-4


def test_bf16_tiles_add_no_error_beyond_bf16s_own(tmp_path):
    nets = write_checkpoint(tmp_path / "ckpt-000000005.pt", [*MODELS["resnet"], *LIVELY])
    net = nets["G_ab"].eval()
    x = torch.rand(3, 61, 90, generator=torch.Generator().manual_seed(3)) * 2 - 1
    fp32 = untiled(net, x, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = untiled(net, x, 4).float()
    tiled_bf16 = tiled(net, x, 4, tile=20, precision="bf16")
    own = (bf16 - fp32).abs().mean().item()
    assert 0 < own < 0.05
    # Tiles keep activations and norm statistics in fp32 between layers, so they stay at least as close to fp32
    # as untiled bf16 does, and as close to untiled bf16 as bf16 is to fp32.
    assert (tiled_bf16 - fp32).abs().mean().item() <= 1.5 * own
    assert (tiled_bf16 - bf16).abs().mean().item() <= 1.5 * own


def test_translate_command_with_tile_writes_the_untiled_images_and_shows_progress(tmp_path, capsys):
    path = tmp_path / "ckpt-000000005.pt"
    write_checkpoint(path, [*MODELS["resnet"], *LIVELY])
    random_image(tmp_path / "in" / "wide.png", 83, 45, seed=5)
    random_image(tmp_path / "in" / "tall.png", 30, 71, seed=6)
    outputs = {}
    for tile in (0, 16):
        out = tmp_path / f"tile-{tile}"
        assert main(["--checkpoint", str(path), "--input", str(tmp_path / "in"), "--output", str(out),
                     "--device", "cpu", "--tile", str(tile)]) == 0
        outputs[tile] = {n: np.asarray(Image.open(out / "images" / n), dtype=np.int16) for n in ("wide.png",
                                                                                                  "tall.png")}
    for name in ("wide.png", "tall.png"):
        # Within 1e-4 in [-1, 1] before rounding: at most one 8-bit level apart after.
        assert np.abs(outputs[16][name] - outputs[0][name]).max() <= 1
    err = capsys.readouterr().err
    runner = TiledForward(16, CPU)
    gens = load_generators(path, "AtoB")
    total = sum(runner.count_tiles(gens.net, (1, 3, h, w)) for h, w in ((48, 84), (72, 32)))
    assert f"tiles: {total:,}/{total:,} tiles (100%)" in err

    with pytest.raises(SystemExit):
        main(["--checkpoint", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "x"),
              "--tile", "-3"])
    assert "--tile must be a positive number of pixels" in capsys.readouterr().err


def test_the_tile_count_is_what_the_run_counts_and_unknown_layers_are_named(tmp_path):
    nets = write_checkpoint(tmp_path / "ckpt-000000005.pt", ["model.generator=unet_128", "model.ngf=2"])
    progress = Progress(None, enabled=False, unit="tiles")
    x = to_tensor(Image.new("RGB", (130, 70)))
    next(translate_tiled(nets["G_ab"].eval(), 128, [("x", x)], CPU, 32, progress=progress))
    assert progress.done == progress.total == TiledForward(32, CPU).count_tiles(nets["G_ab"], (1, 3, 128, 256))

    odd = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Upsample(scale_factor=2))
    with pytest.raises(TileError, match="a Upsample layer cannot be run tile by tile"):
        TiledForward(8, CPU)(odd.eval(), torch.zeros(1, 3, 8, 8))
