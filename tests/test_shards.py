"""pipeline.shards on a real folder tree: corrupt files skipped and listed, exact bytes and names,
deterministic tars, shard limits, and outputs that are never mixed or left looking complete."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from pipeline import shards
from pipeline.shards import (
    ShardError,
    load_manifest,
    main,
    sample_key,
    sha256_file,
    split_pattern,
    write_shards,
)

ROOT = Path(__file__).resolve().parent.parent

# Relative paths per split; the format comes from the extension. Differing sizes, a subfolder, dots in a name,
# upper-case extensions and a non-ASCII name.
LAYOUT = {
    "trainA": ["000.png", "001.jpg", "002.webp", "003.JPEG", "sub/img.4.png"],
    "trainB": ["b0.jpeg", "b1.PNG", "b2.webp", "deep/er/b3.jpg"],
    "testA": ["t0.png", "t1.jpg"],
    "testB": ["sub/café.webp", "t1.png"],
}
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def make_image(path: Path, seed: int, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=FORMATS[path.suffix.lower()], quality=90)


@pytest.fixture
def tree(tmp_path) -> Path:
    """The reference layout with one truncated JPEG in trainA and a non-image file."""
    src = tmp_path / "src"
    for s, (split, names) in enumerate(LAYOUT.items()):
        for i, name in enumerate(names):
            make_image(src / split / name, seed=10 * s + i, size=(20 + 3 * i, 16 + 2 * s))
    full = (src / "trainA" / "001.jpg").read_bytes()
    (src / "trainA" / "broken.jpg").write_bytes(full[: len(full) // 2])
    (src / "trainA" / "notes.txt").write_text("not an image")
    return src


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tars(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


def read_split(out: Path, split: str) -> list[dict]:
    return list(wds.WebDataset(split_pattern(out, split), shardshuffle=False))


def test_corrupt_file_is_skipped_and_everything_else_is_stored_exactly(tree, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert main([str(tree), str(out), "--maxcount", "2"]) == 0
    manifest = load_manifest(out)

    # The corrupt file: listed with a reason, warned about, named in the summary.
    assert [(s["split"], s["path"]) for s in manifest["skipped"]] == [("trainA", "trainA/broken.jpg")]
    assert "truncated" in manifest["skipped"][0]["reason"].lower()
    assert any("broken.jpg" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    stdout = capsys.readouterr().out
    assert "skipped 1 unreadable" in stdout
    assert [line.split(":")[0] for line in stdout.splitlines()[:4]] == list(LAYOUT)

    # Every other image: in sorted order, under its key, with its exact bytes, pixels and name.
    for split, names in LAYOUT.items():
        samples = read_split(out, split)
        ordered = sorted(names)
        assert manifest["splits"][split]["count"] == len(ordered)
        assert [s["name.txt"].decode("utf-8") for s in samples] == ordered
        for sample, name in zip(samples, ordered):
            source = tree / split / name
            assert sample["__key__"] == sample_key(name) and "." not in sample["__key__"]
            ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[FORMATS[source.suffix.lower()]]
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {ext, "name.txt"}
            assert sample[ext] == source.read_bytes()
            stored = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
            assert np.array_equal(stored, np.asarray(Image.open(source).convert("RGB")))
    assert sample_key("sub/img.4.png") == "sub_img_4"


@pytest.mark.parametrize("maxcount, counts", [(1, [1] * 5), (2, [2, 2, 1]), (3, [3, 2]), (1000, [5])])
def test_maxcount_sets_the_shards(tree, tmp_path, maxcount, counts):
    manifest = write_shards(tree, tmp_path / "out", splits=["trainA"], maxcount=maxcount)
    entry = manifest["splits"]["trainA"]
    assert [s["count"] for s in entry["shards"]] == counts
    assert [s["path"] for s in entry["shards"]] == [f"trainA/trainA-{i:06d}.tar" for i in range(len(counts))]
    assert sorted(tars(tmp_path / "out")) == [s["path"] for s in entry["shards"]]
    assert list(braceexpand(entry["pattern"])) == [s["path"] for s in entry["shards"]]


def test_manifest_matches_the_files(tree, tmp_path):
    out = tmp_path / "out"
    manifest = write_shards(tree, out, maxcount=3)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["version"] == 1 and manifest["source"] == str(tree.resolve())
    assert list(manifest["splits"]) == list(LAYOUT)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = out / shard["path"]
            assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
            with tarfile.open(path) as tar:
                assert len([m for m in tar.getmembers() if m.name.endswith(".name.txt")]) == shard["count"]
        assert sum(s["count"] for s in entry["shards"]) == entry["count"] == len(LAYOUT[split])
        assert split_pattern(out, split) == str(out.resolve() / entry["pattern"])


def test_tar_members_have_fixed_metadata_and_readable_mode(tree, tmp_path):
    manifest = write_shards(tree, tmp_path / "out", splits=["testB"])
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "out" / manifest["splits"]["testB"]["shards"][0]["path"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # Not mkstemp's 0o600.
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["sub_café.webp", "sub_café.name.txt", "t1.png", "t1.name.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_existing_output_is_refused_and_left_untouched(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tree), str(out), "--maxcount", "2"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main([str(tree), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert snapshot(out) == before

    # A stray tar (no manifest) or a manifest alone is enough to refuse.
    stray = tmp_path / "stray"
    (stray / "x").mkdir(parents=True)
    (stray / "x" / "old.tar").write_bytes(b"")
    assert main([str(tree), str(stray)]) == 2
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "manifest.json").write_text("{}")
    with pytest.raises(ShardError, match="overwrite"):
        write_shards(tree, tmp_path / "only")


def test_reruns_give_byte_identical_shards(tree, tmp_path):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main([str(tree), str(out), "--maxcount", "1"]) == 0
    first, first_manifest = tars(out), load_manifest(out)
    assert main([str(tree), str(out), "--maxcount", "1", "--overwrite"]) == 0
    assert tars(out) == first and load_manifest(out) == first_manifest
    assert main([str(tree), str(fresh), "--maxcount", "1", "--overwrite"]) == 0
    assert tars(fresh) == first and load_manifest(fresh)["splits"] == first_manifest["splits"]

    # Fewer, larger shards replace the old ones entirely.
    assert main([str(tree), str(out), "--overwrite"]) == 0
    assert sorted(tars(out)) == [f"{s}/{s}-000000.tar" for s in sorted(LAYOUT)]
    assert load_manifest(out)["splits"]["trainA"]["pattern"] == "trainA/trainA-000000.tar"


def test_overwriting_some_splits_keeps_the_others(tree, tmp_path):
    out = tmp_path / "out"
    before = write_shards(tree, out)
    kept = {p: d for p, d in tars(out).items() if not p.startswith("testA/")}
    after = write_shards(tree, out, splits=["testA"], maxcount=1, overwrite=True)
    assert {p: d for p, d in tars(out).items() if not p.startswith("testA/")} == kept
    assert [s["count"] for s in after["splits"]["testA"]["shards"]] == [1, 1]
    assert {s: e for s, e in after["splits"].items() if s != "testA"} == {
        s: e for s, e in before["splits"].items() if s != "testA"}
    assert after["skipped"] == before["skipped"]  # trainA's broken file is still listed.
    assert load_manifest(out) == after


def test_maxsize_closes_shards(tree, tmp_path):
    sized = write_shards(tree, tmp_path / "sized", splits=["trainA"], maxsize=10240)["splits"]["trainA"]
    assert len(sized["shards"]) > 1 and all(s["bytes"] <= 10240 and s["count"] >= 1 for s in sized["shards"])
    assert sum(s["count"] for s in sized["shards"]) == 5
    # A sample larger than maxsize still gets a shard, alone.
    tiny = write_shards(tree, tmp_path / "tiny", splits=["trainA"], maxsize=1)["splits"]["trainA"]
    assert [s["count"] for s in tiny["shards"]] == [1] * 5


def test_empty_and_missing_splits(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    make_image(src / "trainA" / "a.png", seed=0, size=(8, 8))
    (src / "testA" / "nothing_here").mkdir(parents=True)
    (src / "testA" / "readme.txt").write_text("no images")
    assert main([str(src), str(out)]) == 0
    manifest = load_manifest(out)
    assert list(manifest["splits"]) == ["trainA", "testA"]
    assert manifest["splits"]["testA"] == {"count": 0, "pattern": None, "shards": []}
    assert not list((out / "testA").glob("*"))
    stdout = capsys.readouterr().out
    assert "testA: 0 images" in stdout and "trainB: no folder" in stdout
    with pytest.raises(ShardError, match="testA"):
        split_pattern(out, "testA")


def test_source_without_split_folders_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "reference layout" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupted_run_never_looks_complete(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls, verify = [], shards._verify_image

    def failing(data):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return verify(data)

    monkeypatch.setattr(shards, "_verify_image", failing)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tree, out, maxcount=2)
    # Complete shards only: no manifest, no temporary file.
    assert sorted(tars(out)) == ["trainA/trainA-000000.tar"]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["trainA-000000.tar"]
    with pytest.raises(ShardError):
        load_manifest(out)
    monkeypatch.setattr(shards, "_verify_image", verify)
    assert main([str(tree), str(out)]) == 2
    assert main([str(tree), str(out), "--overwrite"]) == 0


def test_colliding_and_long_names_get_distinct_keys(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    long = "d" * 60 + "/" + "n" * 80 + ".png"
    names = ["a.png", "a.jpg", "a.b.png", "a_b.png", long]
    for i, name in enumerate(names):
        make_image(src / "trainA" / name, seed=i, size=(8 + i, 8))
    write_shards(src, out)
    samples = read_split(out, "trainA")
    assert [s["name.txt"].decode() for s in samples] == sorted(names)
    assert len({s["__key__"] for s in samples}) == len(names)
    assert {s["__key__"] for s in samples} >= {"a", "a_1", "a_b", "a_b_1"}


def test_module_runs_from_the_command_line(tree, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.shards", str(tree), str(out), "--splits", "testA"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("testA: 2 images, 0 skipped, 1 shard(s)")
    assert list(load_manifest(out)["splits"]) == ["testA"]
