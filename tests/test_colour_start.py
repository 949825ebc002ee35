"""model.colour_start=transfer: a run's colour generators start as the linear colour transfer between the domains'
pixel statistics, fitted from the shards as training decodes them, and keep it (a buffer, checkpointed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.train.colour_start import domain_moments
from pipeline.train.loop import run

pytestmark = pytest.mark.slow

# Whole 40 px images (a multiple of 4: preprocess none keeps them), each read once (48 per domain).
WHOLE = {"data.preprocess": "none", "model.colour_start_images": 48}


def moments_of(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a folder's pixels in [-1, 1], from the image files (not the shards)."""
    pixels = np.concatenate([np.asarray(Image.open(f).convert("RGB"), np.float64).reshape(-1, 3)
                             for f in sorted(folder.glob("*.png"))]) / 127.5 - 1
    return pixels.mean(0), np.cov(pixels.T, bias=True)


def monge_kantorovich(source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray]):
    """Pitie and Kokaram's closed form, written apart from the pipeline's (numpy, eigh by hand)."""
    def power(m, p):
        values, vectors = np.linalg.eigh(m)
        return (vectors * values**p) @ vectors.T
    root, inverse = power(source[1], 0.5), power(source[1], -0.5)
    weight = inverse @ power(root @ target[1] @ root, 0.5) @ inverse
    return weight, target[0] - weight @ source[0]


@pytest.mark.parametrize("method", ["cyclegan", "fastcut"])
def test_a_fresh_run_starts_from_the_domains_colour_transfer_and_keeps_it(shards, tiny, tmp_path, method):
    overrides = tiny(**WHOLE, **{"model.g_variant": "colour", "model.colour_start": "transfer",
                                 "model.method": method, "train.steps": 2, "checkpoint.every_steps": 2})
    cfg = load_config([], overrides)
    images = Path(shards["trainA"]).parent.parent.parent / "images"  # make_synthetic's folders, before sharding
    want = {d: moments_of(images / f"train{d}") for d in ("A", "B")}
    urls = {d: sorted(str(p) for p in Path(shards[f"train{d}"]).parent.glob("*.tar")) for d in ("A", "B")}
    got = domain_moments(cfg, urls)
    for d in ("A", "B"):
        assert got[d].images == 48 and got[d].pixels == 48 * 40 * 40
        assert np.allclose(got[d].mean.numpy(), want[d][0], atol=1e-9)
        assert np.allclose(got[d].covariance.numpy(), want[d][1], atol=1e-9)
    assert not np.allclose(want["A"][0], want["B"][0], atol=0.05)  # The domains differ in colour.

    run(cfg)
    nets = load_checkpoint(tmp_path / "run" / "ckpt-000000002")["nets"]
    generators = (("G_ab", "A", "B"), ("G_ba", "B", "A")) if method == "cyclegan" else (("G", "A", "B"),)
    for name, source, target in generators:
        weight, bias = monge_kantorovich(want[source], want[target])
        assert np.allclose(nets[name]["skip.weight"].numpy(), weight, atol=1e-5), name
        assert np.allclose(nets[name]["skip.bias"].numpy(), bias, atol=1e-5), name


def test_the_statistics_spread_over_the_shards_and_pass_a_broken_one(tmp_path, caplog):
    from pipeline.data.moments import pixel_moments
    from pipeline.data.pixels import PixelFormat
    from pipeline.data.shards import write_shards
    from pipeline.data.stream import Augment

    # Shards written in an order, as they often are: the first holds dark images, the second bright ones.
    folder = tmp_path / "images" / "trainA"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 20 if i < 4 else 220, np.uint8)).save(folder / f"{i:05d}.png")
    write_shards(tmp_path / "images", tmp_path / "shards", splits=["trainA"], maxcount=4, shuffle_seed=None)
    urls = sorted(str(p) for p in (tmp_path / "shards" / "trainA").glob("*.tar"))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar file" * 100)
    augment = Augment("none", 8, 8, flip=False)
    got = pixel_moments([*urls, str(broken)], augment, PixelFormat(), images=3, label="domain A")
    # One image from each of three shards spaced through the list; the broken one is passed with a warning.
    assert got.images == 2 and np.allclose(got.mean.numpy(), (20 + 220) / 2 / 127.5 - 1)
    assert "broken.tar" in caplog.text
    got = pixel_moments(urls, augment, PixelFormat(), images=100)  # Fewer than asked: every image once.
    assert got.images == 8 and got.pixels == 8 * 64


def test_no_readable_shard_or_an_image_the_domain_cannot_take_is_a_clear_error(tmp_path):
    from pipeline.data.moments import pixel_moments
    from pipeline.data.pixels import PixelFormat
    from pipeline.data.shards import write_shards
    from pipeline.data.stream import Augment, DataError, DomainMismatch

    augment = Augment("none", 8, 8, flip=False)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar file" * 100)
    with pytest.raises(DataError, match="found no readable image in the 1 shard.*set model.colour_start=identity"):
        pixel_moments([str(broken)], augment, PixelFormat(), images=4, label="domain A")
    # A grayscale file that the domain refuses is a setting to change, not a broken shard: raised at once.
    folder = tmp_path / "images" / "trainA"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 20, np.uint8)).save(folder / "gray.png")
    write_shards(tmp_path / "images", tmp_path / "shards", splits=["trainA"])
    urls = sorted(str(p) for p in (tmp_path / "shards" / "trainA").glob("*.tar"))
    with pytest.raises(DomainMismatch, match="mismatch"):
        pixel_moments([*urls, *urls], augment, PixelFormat(mismatch="error"), images=4, label="domain A")
