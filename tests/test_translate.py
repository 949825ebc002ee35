"""Batch translation: padding, file names and sizes, shards, reference files, results page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import load_config, to_yaml
from pipeline.data.images import to_image, to_tensor
from pipeline.engine.checkpoint import FORMAT, save_atomic
from pipeline.gan.networks import build_generator, generator_from
from pipeline.infer.generators import PaddedGenerator, infer_generator_settings, load_generators, reflect_pad_to
from pipeline.translate import main

TINY = ["model.generator=resnet_6blocks", "model.ngf=4", "data.crop_size=32", "data.load_size=36"]


def write_checkpoint(path: Path, overrides: list[str] = TINY, seed: int = 0, run_id: str = "") -> dict:
    """A checkpoint file in this project's format holding two seeded tiny generators (no training needed)."""
    cfg = load_config(overrides=overrides)
    torch.manual_seed(seed)
    nets = {name: generator_from(cfg.model) for name in ("G_ab", "G_ba")}
    state = {"format": FORMAT, "config": to_yaml(cfg), "step": 5, "mlflow_run_id": run_id,
             "nets": {name: net.state_dict() for name, net in nets.items()}}
    save_atomic(state, path)
    return nets


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("ckpt") / "ckpt-000000005.pt"
    return path, write_checkpoint(path)


def random_image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def expected(net: torch.nn.Module, path: Path, multiple: int = 4) -> np.ndarray:
    """One image alone through PaddedGenerator: what batched translation must reproduce."""
    with torch.no_grad():
        out = PaddedGenerator(net.eval(), multiple)(to_tensor(Image.open(path).convert("RGB"))[None])[0]
    return np.asarray(to_image(out), dtype=np.int16)


@pytest.mark.parametrize("n,pad", [(7, 5), (5, 3), (4, 0), (3, 9), (2, 7), (1, 3)])
def test_reflect_padding_equals_numpy_reflect_for_any_amount(n, pad):
    x = torch.arange(2 * n, dtype=torch.float32).view(1, 2, n, 1).expand(1, 2, n, 3)
    padded, top, left = reflect_pad_to(x, n + pad, 3)
    before, after = pad // 2, pad - pad // 2  # Split evenly, the odd pixel after.
    mode = "reflect" if n > 1 else "edge"  # A 1-pixel side has nothing to mirror: it repeats.
    want = np.pad(x.numpy(), ((0, 0), (0, 0), (before, after), (0, 0)), mode=mode)
    assert (top, left) == (before, 0)
    np.testing.assert_array_equal(padded.numpy(), want)
    if before < n and after < n:
        torch.testing.assert_close(padded, F.pad(x, (0, 0, before, after), mode="reflect"))


def test_translate_folder_of_odd_sizes_keeps_names_and_sizes(ckpt, tmp_path, capsys):
    path, nets = ckpt
    sizes = {"a.png": (37, 53), "sub/b.png": (61, 29), "sub/deeper/c d.jpg": (38, 54), "e.webp": (40, 40)}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        random_image(tmp_path / "in" / name, w, h, seed=i)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    assert main(["--checkpoint", str(path), "--input", str(tmp_path / "in"), "--output", str(out),
                 "--batch-size", "2", "--device", "cpu"]) == 0
    assert "4 images translated AtoB" in capsys.readouterr().out

    written = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert written == sorted(sizes)
    for name, size in sizes.items():
        with Image.open(out / "images" / name) as img:
            assert img.size == size
            assert img.format == {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[Path(name).suffix]
    # Lossless outputs equal each image translated alone: a.png (37x53) shared its 40x56 batch with c d.jpg.
    got = np.asarray(Image.open(out / "images" / "a.png"), dtype=np.int16)
    assert np.abs(got - expected(nets["G_ab"], tmp_path / "in" / "a.png")).max() <= 1
    got = np.asarray(Image.open(out / "images" / "sub/b.png"), dtype=np.int16)
    assert np.abs(got - expected(nets["G_ab"], tmp_path / "in" / "sub/b.png")).max() <= 1

    manifest = json.loads((out / "translations.json").read_text())
    assert manifest["count"] == 4 and manifest["direction"] == "AtoB"
    assert {f["name"]: (f["width"], f["height"]) for f in manifest["files"]} == sizes
    page = (out / "index.html").read_text()
    assert all(name in page for name in ("a.png", "sub/b.png", "c d.jpg"))
    assert len(list((out / "page").glob("*-input.png"))) == 4
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height > 4 * 128


def test_translate_shards_keeps_original_names_and_png_option(ckpt, shards, tmp_path):
    path, _ = ckpt
    out = tmp_path / "out"
    assert main(["--checkpoint", str(path), "--direction", "BtoA", "--input", shards["testB"], "--output", str(out),
                 "--ext", "jpg", "--size", "24"]) == 0
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == [f"{i:05d}.jpg" for i in range(8)]  # From name.txt (00000.png ...), format changed to JPEG.
    with Image.open(out / "images" / "00003.jpg") as img:
        assert img.size == (24, 24)
    manifest = json.loads((out / "translations.json").read_text())
    assert [f["key"] for f in manifest["files"]] == [f"{i:05d}" for i in range(8)]


def test_reference_layout_checkpoint_translates(ckpt, tmp_path, capsys):
    path, nets = ckpt
    ref = tmp_path / "reference"
    ref.mkdir()
    torch.save(nets["G_ab"].state_dict(), ref / "latest_net_G_A.pth")
    torch.save(nets["G_ba"].state_dict(), ref / "latest_net_G_B.pth")
    random_image(tmp_path / "in" / "x.png", 45, 31, seed=7)

    # Architecture read off the keys (resnet_6blocks, ngf 4, instance norm): no --model options needed.
    # Both on CPU with the same kernels: the same computation, so the same bytes (cudnn.benchmark would not be).
    assert main(["--checkpoint", str(ref / "latest_net_G_A.pth"), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "ref_out"), "--device", "cpu"]) == 0
    assert main(["--checkpoint", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "ours"),
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ref_out" / "images" / "x.png")),
                                  np.asarray(Image.open(tmp_path / "ours" / "images" / "x.png")))

    # The folder picks the file of the direction; the reverse generator is found beside it.
    gens = load_generators(ref, "BtoA")
    assert gens.source == "reference" and gens.reverse is not None
    torch.testing.assert_close(gens.net.state_dict(), nets["G_ba"].state_dict())

    # A G_A file asked for B->A, or given the wrong architecture, is refused with what to do.
    capsys.readouterr()
    assert main(["--checkpoint", str(ref / "latest_net_G_A.pth"), "--direction", "BtoA", "--input",
                 str(tmp_path / "in"), "--output", str(tmp_path / "x")]) == 2
    assert "latest_net_G_B.pth" in capsys.readouterr().err
    assert main(["--checkpoint", str(ref / "latest_net_G_A.pth"), "--model.generator", "resnet_9blocks",
                 "--input", str(tmp_path / "in"), "--output", str(tmp_path / "x")]) == 2
    assert "resnet_9blocks" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["resnet_6blocks", "resnet_9blocks", "unet_128", "unet_256"])
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_reference_settings_are_read_off_the_keys(arch, norm):
    state = build_generator(arch, ngf=2, norm=norm).state_dict()
    assert infer_generator_settings(state) == {"generator": arch, "ngf": 2, "norm": norm}


def test_zero_block_padding_is_read_off_a_reference_files_keys(tmp_path):
    state = build_generator("resnet_6blocks", ngf=2, padding="zero").state_dict()
    assert infer_generator_settings(state) == {"generator": "resnet_6blocks", "ngf": 2, "norm": "instance",
                                               "padding": "zero"}


@pytest.mark.parametrize("model", [["model.norm=group", "model.norm_groups=2"], ["model.norm=layer"],
                                   ["model.padding=replicate"], ["model.padding=zero"]],
                         ids=["group", "layer", "replicate", "zero"])
def test_checkpoints_of_the_other_norms_and_paddings_translate_as_their_networks_do(tmp_path, model):
    path = tmp_path / "ckpt-000000005.pt"
    nets = write_checkpoint(path, [*TINY, *model])
    random_image(tmp_path / "in" / "x.png", 37, 29, seed=4)
    assert main(["--checkpoint", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--ext", "png"]) == 0
    got = np.asarray(Image.open(tmp_path / "out" / "images" / "x.png"), dtype=np.int16)
    assert np.abs(got - expected(nets["G_ab"], tmp_path / "in" / "x.png")).max() <= 1


def test_unet_pads_small_images_and_bf16_runs(tmp_path):
    path = tmp_path / "unet.pt"
    nets = write_checkpoint(path, ["model.generator=unet_128", "model.ngf=2"])
    random_image(tmp_path / "in" / "small.png", 21, 13, seed=3)  # Padded to 128x128: pads wider than the image.
    assert main(["--checkpoint", str(path), "--input", str(tmp_path / "in" / "small.png"), "--output",
                 str(tmp_path / "fp32")]) == 0
    got = np.asarray(Image.open(tmp_path / "fp32" / "images" / "small.png"), dtype=np.int16)
    assert got.shape == (13, 21, 3)
    assert np.abs(got - expected(nets["G_ab"], tmp_path / "in" / "small.png", 128)).max() <= 1
    assert main(["--checkpoint", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "bf16"),
                 "--precision", "bf16"]) == 0
    low = np.asarray(Image.open(tmp_path / "bf16" / "images" / "small.png"), dtype=np.int16)
    assert np.abs(low - got).mean() < 8  # bf16 keeps 8 bits of mantissa: close, not equal.
