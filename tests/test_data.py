import io
import itertools
from pathlib import Path

import pytest
import torch
from support.loaders import data_cfg
from webdataset.tariterators import tarfile_samples

from pipeline.data.held_out import held_out
from pipeline.data.images import normalize
from pipeline.data.stream import Augment, DataError, expand_pattern, train_loader


def take(loader, n):
    return [(a.clone(), b.clone()) for a, b in itertools.islice(iter(loader), n)]


def test_batches_are_shaped_and_scaled(shards):
    a, b = take(train_loader(data_cfg(shards, workers=0), seed=0, rank=0), 1)[0]
    assert a.shape == b.shape == (2, 3, 32, 32) and a.dtype == torch.uint8  # normalised on the device
    x = normalize(a)
    assert x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x, a.float() / 127.5 - 1)
    assert not torch.equal(a, b)


def test_two_workers_are_distinct_and_reproducible(shards):
    cfg = data_cfg(shards)
    first = take(train_loader(cfg, seed=0, rank=0), 6)
    again = take(train_loader(cfg, seed=0, rank=0), 6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, again))
    # Batches 0, 2, 4 come from worker 0 and 1, 3, 5 from worker 1: no two batches repeat each other.
    for i, j in itertools.combinations(range(6), 2):
        assert not torch.equal(first[i][0], first[j][0])
    other_rank = take(train_loader(cfg, seed=0, rank=1), 6)
    other_seed = take(train_loader(cfg, seed=1, rank=0), 6)
    assert not any(torch.equal(x[0], y[0]) for x, y in zip(first, other_rank))
    assert not any(torch.equal(x[0], y[0]) for x, y in zip(first, other_seed))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_exactly(shards, workers):
    cfg = data_cfg(shards, workers=workers)
    straight = take(train_loader(cfg, seed=3, rank=0), 7)
    resumed = take(train_loader(cfg, seed=3, rank=0, start_batch=4), 3)
    for x, y in zip(straight[4:], resumed):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_missing_shards_name_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r"nope/\*\.tar"):
        expand_pattern(str(tmp_path / "nope" / "*.tar"))
    with pytest.raises(DataError, match=r"missing file.*x-000001\.tar"):
        expand_pattern(str(tmp_path / "x-{000000..000001}.tar"))
    with pytest.raises(DataError, match="empty shard pattern"):
        expand_pattern("")


def test_augment_crops_and_flips_deterministically():
    import random

    from PIL import Image

    img = Image.new("RGB", (50, 40))
    img.putpixel((0, 0), (255, 0, 0))
    aug = Augment("resize_and_crop", load_size=40, crop_size=32, flip=True)
    x = aug(img, random.Random("s:1"))
    assert x.shape == (3, 32, 32)
    assert torch.equal(x, aug(img, random.Random("s:1")))


def test_held_out_is_in_shard_order(shards):
    keys, images = held_out(shards["testA"], 3, 32)
    in_shards = [s["__key__"] for s in tarfile_samples([{"url": u} for u in expand_pattern(shards["testA"])])]
    assert keys == in_shards[:3] and images.shape == (3, 3, 32, 32)
    # A folder of shards is its *.tar, as for training (sample grids once refused it: no image files in it).
    folder_keys, folder_images = held_out(str(Path(shards["testA"]).parent), 3, 32)
    assert folder_keys == keys and torch.equal(folder_images, images)


def test_held_out_of_only_unreadable_images_says_so(tmp_path):
    import tarfile

    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        member = tarfile.TarInfo("a.png")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"junk"))
    with pytest.raises(DataError, match="holds no readable images"):
        held_out(str(shard), 2, 32)


@pytest.fixture
def three_samples(tmp_path, synthetic):
    """A domain of 3 images in one shard."""
    from pipeline.data.shards import write_shards

    synthetic.make_synthetic(tmp_path / "images", train=3, test=1, size=40, seed=5)
    write_shards(tmp_path / "images", tmp_path / "shards", splits=["trainA"])
    return str(tmp_path / "shards" / "trainA" / "*.tar")


def test_local_domain_smaller_than_a_batch_is_refused_at_start_up(shards, three_samples):
    cfg = data_cfg(shards, train_b=three_samples, batch_per_rank=4, workers=0)
    with pytest.raises(DataError, match=r"domain B: shard pattern '.*trainA/\*\.tar' holds 3 sample\(s\), fewer than "
                                         r"one batch \(data.batch_per_rank=4\)"):
        train_loader(cfg, seed=0, rank=0)
    take(train_loader(data_cfg(shards, train_b=three_samples, batch_per_rank=3, workers=0), seed=0, rank=0), 1)


def test_file_urls_are_local_paths_globbed_and_checked_at_start_up(shards, three_samples, tmp_path):
    import glob

    assert expand_pattern(f"file:{three_samples}") == sorted(glob.glob(three_samples))
    with pytest.raises(DataError, match=r"missing file.*nope\.tar"):
        expand_pattern(f"file:{tmp_path}/nope.tar")
    cfg = data_cfg(shards, train_b=f"file:{three_samples}", batch_per_rank=4, workers=0)
    with pytest.raises(DataError, match=r"domain B: shard pattern 'file:.*' holds 3 sample\(s\), fewer than one batch"):
        train_loader(cfg, seed=0, rank=0)


def test_remote_domain_smaller_than_a_batch_fails_on_its_first_pass(shards, three_samples):
    import glob

    remote = f"pipe:cat {glob.glob(three_samples)[0]}"
    loader = train_loader(data_cfg(shards, train_a=remote, batch_per_rank=4, workers=0), seed=0, rank=0)
    with pytest.raises(DataError, match=r"domain A: shard pattern 'pipe:cat .*' holds 3 sample\(s\), fewer than one "
                                        r"batch \(data.batch_per_rank=4\)"):
        next(iter(loader))
    a, _ = take(train_loader(data_cfg(shards, train_a=remote, batch_per_rank=3, workers=0), seed=0, rank=0), 1)[0]
    assert a.shape[0] == 3


def test_trainer_refuses_a_small_domain_before_building_anything(shards, three_samples, tmp_path, capsys):
    from pipeline.train.cli import main

    code = main([f"data.train_a={shards['trainA']}", f"data.train_b={three_samples}", "data.batch_per_rank=8",
                 f"run_dir={tmp_path}/run", "tracking.enabled=false", "data.workers=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"domain B: shard pattern '{three_samples}' holds 3 sample(s)" in err and "batch_per_rank=8" in err
    assert not (tmp_path / "run").exists()


def test_a_folder_of_images_is_named_with_the_command_that_shards_it(tmp_path, synthetic, shards):
    synthetic.make_synthetic(tmp_path / "photos", train=3, test=1, size=16, seed=2)
    folder = tmp_path / "photos" / "trainA"
    with pytest.raises(DataError) as caught:
        expand_pattern(str(folder), "data.train_a")
    message = str(caught.value)
    assert f"data.train_a='{folder}' is a folder of images" in message and "missing file" not in message
    command = f"python -m pipeline.shards {folder.parent} {folder.parent / 'shards'} --splits trainA"
    assert command in message and f"data.train_a='{folder.parent / 'shards' / 'trainA'}'" in message

    # The command it gives works, and the folder it names is then accepted: DIR means DIR/*.tar.
    from pipeline.shards import main as shards_main

    assert shards_main([str(folder.parent), str(folder.parent / "shards"), "--splits", "trainA",
                        "--no-progress"]) == 0
    shard_dir = folder.parent / "shards" / "trainA"
    assert expand_pattern(str(shard_dir)) == sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert expand_pattern(str(shard_dir)) == expand_pattern(str(shard_dir / "*.tar"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no shards .* and no images"):
        expand_pattern(str(empty), "data.train_b")


def test_training_names_the_key_of_a_folder_of_images(tiny, tmp_path, synthetic, capsys):
    from pipeline.train.cli import main as train_main

    synthetic.make_synthetic(tmp_path / "photos", train=3, test=1, size=16, seed=2)
    assert train_main(tiny(**{"data.train_b": str(tmp_path / "photos" / "trainB")})) == 2
    err = capsys.readouterr().err
    assert f"data.train_b='{tmp_path / 'photos' / 'trainB'}' is a folder of images" in err
    assert "python -m pipeline.shards" in err and "Traceback" not in err


def test_the_pixel_limit_is_ours_below_pils_and_above_it():
    """data.max_image_pixels judges from the header: under PIL's own limit (which would decode the image), and
    over twice it (where PIL refuses to open it at all)."""
    import io as _io

    from PIL import Image

    from pipeline.data.skips import unusable

    out = _io.BytesIO()
    Image.new("RGB", (40, 40)).save(out, "png")
    sample = {"png": out.getvalue(), "__key__": "k", "__url__": "u"}
    assert unusable(sample) is None
    assert "40x40 = 1,600 pixels, over data.max_image_pixels=1,000" in unusable(sample, max_pixels=1000)
    assert unusable(sample, max_pixels=0) is None
