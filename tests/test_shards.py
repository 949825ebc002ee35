"""Sharding a folder tree: corrupt files skipped and listed, exact bytes, deterministic, safe outputs."""

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.shards import load_manifest, main, sha256_file, split_pattern, write_shards


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("trainA", 5), ("trainB", 4), ("testA", 2), ("testB", 2)):
        (src / split / "sub").mkdir(parents=True)
        for i in range(n):
            ext = ("png", "jpg", "webp")[i % 3]
            rel = f"sub/img.{i}.{ext}" if i == 0 else f"{i:03d}.{ext}"
            img = Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8))
            img.save(src / split / rel, quality=90)
            files[(split, rel)] = (src / split / rel).read_bytes()
    (src / "trainA" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "trainA" / "notes.txt").write_text("ignored")
    return src, files


def test_corrupt_image_is_skipped_and_listed(tree, tmp_path, capsys):
    src, files = tree
    assert main([str(src), str(tmp_path / "out"), "--maxcount", "2"]) == 0
    manifest = load_manifest(tmp_path / "out")
    assert [s["path"].endswith("broken.jpg") for s in manifest["skipped"]] == [True]
    assert manifest["splits"]["trainA"]["count"] == 5
    assert len(manifest["splits"]["trainA"]["shards"]) == 3  # 5 samples, at most 2 per shard
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_samples_hold_the_original_bytes_and_names(tree, tmp_path):
    src, files = tree
    write_shards(src, tmp_path / "out", maxcount=2)
    seen = {}
    for sample in wds.WebDataset(split_pattern(tmp_path / "out", "trainA"), shardshuffle=False):
        name = sample["name.txt"].decode()
        data = next(sample[k] for k in ("png", "jpg", "webp") if k in sample)
        seen[name] = data
        assert "." not in sample["__key__"]
    expected = {rel: data for (split, rel), data in files.items() if split == "trainA"}
    assert seen == expected


def test_manifest_counts_and_hashes_match_the_files(tree, tmp_path):
    src, _ = tree
    manifest = write_shards(src, tmp_path / "out", maxcount=3)
    for entry in manifest["splits"].values():
        total = 0
        for shard in entry["shards"]:
            path = tmp_path / "out" / shard["path"]
            assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
            with tarfile.open(path) as tar:
                assert len([m for m in tar.getmembers() if m.name.endswith(".name.txt")]) == shard["count"]
            total += shard["count"]
        assert total == entry["count"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_existing_output_needs_overwrite_and_reruns_are_byte_identical(tree, tmp_path, capsys):
    src, _ = tree
    out = tmp_path / "out"
    assert main([str(src), str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*.tar")}
    assert main([str(src), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*.tar")} == before
    assert main([str(src), str(out), "--overwrite"]) == 0
    assert {p: p.read_bytes() for p in out.rglob("*.tar")} == before
    other = tmp_path / "again"
    assert main([str(src), str(other)]) == 0
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*.tar")} == {
        p.relative_to(out): d for p, d in before.items()}


def test_maxsize_closes_shards(tree, tmp_path):
    src, _ = tree
    manifest = write_shards(src, tmp_path / "out", splits=["trainA"], maxsize=4096)
    shards = manifest["splits"]["trainA"]["shards"]
    assert len(shards) > 1 and all(s["count"] >= 1 for s in shards)


def test_missing_layout_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "reference layout" in capsys.readouterr().err
