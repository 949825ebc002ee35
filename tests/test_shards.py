"""pipeline.shards on a real folder tree: corrupt files skipped and listed, exact bytes and names,
deterministic tars, shard limits, and outputs that are never mixed or left looking complete."""

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from pipeline.data import shards
from pipeline.data.shards import ShardError, load_manifest, sample_key, sha256_file, split_pattern, write_shards
from pipeline.shards import main

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
    assert main([str(tree), str(out), "--maxcount", "2", "--no-shuffle"]) == 0
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
    manifest = write_shards(tree, tmp_path / "out", splits=["testB"], shuffle_seed=None)
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
    calls, verify = [], shards.verify_image

    def failing(data):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return verify(data)

    monkeypatch.setattr(shards, "verify_image", failing)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tree, out, maxcount=2)
    # Complete shards only: no manifest, no temporary file.
    assert sorted(tars(out)) == ["trainA/trainA-000000.tar"]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["trainA-000000.tar"]
    with pytest.raises(ShardError):
        load_manifest(out)
    monkeypatch.setattr(shards, "verify_image", verify)
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
    assert sorted(s["name.txt"].decode() for s in samples) == sorted(names)  # Shuffled order, every name once.
    assert len({s["__key__"] for s in samples}) == len(names)
    assert {s["__key__"] for s in samples} >= {"a", "a_1", "a_b", "a_b_1"}


def test_module_runs_from_the_command_line(tree, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.shards", str(tree), str(out), "--splits", "testA"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("testA: 2 images, 0 skipped, 1 shard(s)")
    assert list(load_manifest(out)["splits"]) == ["testA"]


# --- Large trees: parallel encoding, resize/re-encode, shuffling, pipe: output, progress ------------------------


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    """2,000 tiny PNGs (1,200 + 800) and one unreadable file: 'a few thousand images' at test speed."""
    src = tmp_path_factory.mktemp("big") / "src"
    rng = np.random.default_rng(7)
    for split, n in (("trainA", 1200), ("trainB", 800)):
        (src / split / "sub").mkdir(parents=True)
        for i in range(n):
            folder = src / split / ("sub" if i % 10 == 0 else "")
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    (src / "trainB" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return src


def samples_of(out: Path) -> dict[str, set[tuple[str, bytes, bytes]]]:
    return {split: {(s["__key__"], s["name.txt"], s.get("png", s.get("jpg"))) for s in read_split(out, split)}
            for split in load_manifest(out)["splits"]}


def test_two_workers_write_the_same_bytes_as_one(big_tree, tmp_path):
    one = write_shards(big_tree, tmp_path / "one", maxcount=300, workers=1)
    two = write_shards(big_tree, tmp_path / "two", maxcount=300, workers=2)
    assert samples_of(tmp_path / "one") == samples_of(tmp_path / "two")
    assert {s: len(v) for s, v in samples_of(tmp_path / "two").items()} == {"trainA": 1200, "trainB": 800}
    # Not only the same samples: the same tars, byte for byte, and the same manifest.
    assert tars(tmp_path / "one") == tars(tmp_path / "two")
    assert one["splits"] == two["splits"] and one["skipped"] == two["skipped"]
    assert [s["path"] for s in two["skipped"]] == ["trainB/zz_broken.png"]
    # A re-run gives byte-identical shards.
    again = write_shards(big_tree, tmp_path / "two", maxcount=300, workers=2, overwrite=True)
    assert tars(tmp_path / "two") == tars(tmp_path / "one") and again == two


def test_workers_write_the_same_bytes_when_re_encoding(big_tree, tmp_path):
    options = dict(splits=["trainB"], maxcount=300, resize=8, format="jpeg")
    one = write_shards(big_tree, tmp_path / "one", workers=1, **options)
    two = write_shards(big_tree, tmp_path / "two", workers=2, **options)
    assert tars(tmp_path / "one") == tars(tmp_path / "two") and len(tars(tmp_path / "two")) == 3
    assert one["splits"] == two["splits"] and one["skipped"] == two["skipped"]
    assert [s["path"] for s in two["skipped"]] == ["trainB/zz_broken.png"]
    sample = next(iter(wds.WebDataset(split_pattern(tmp_path / "two", "trainB"), shardshuffle=False)))
    with Image.open(io.BytesIO(sample["jpg"])) as img:
        assert (img.format, img.size) == ("JPEG", (8, 8))


def test_resize_and_reencode_at_shard_time(tree, tmp_path):
    manifest = write_shards(tree, tmp_path / "out", splits=["trainA", "testB"], resize=12, format="jpeg", quality=90,
                            shuffle_seed=None)
    assert manifest["options"] == {"resize": 12, "format": "jpeg", "quality": 90, "shuffle_seed": None,
                                   "maxcount": 1000, "maxsize": 10**9}
    for split in ("trainA", "testB"):
        samples = read_split(tmp_path / "out", split)
        assert [s["name.txt"].decode() for s in samples] == sorted(LAYOUT[split])  # Original names kept.
        for sample in samples:
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"jpg", "name.txt"}
            with Image.open(io.BytesIO(sample["jpg"])) as img:
                assert img.format == "JPEG" and img.size == (12, 12)
            # Exactly the training transform's bicubic resize, then JPEG at the quality asked.
            source = Image.open(tree / split / sample["name.txt"].decode()).convert("RGB")
            expected = io.BytesIO()
            source.resize((12, 12), Image.BICUBIC).save(expected, "JPEG", quality=90)
            assert sample["jpg"] == expected.getvalue()
    assert [s["path"] for s in manifest["skipped"]] == ["trainA/broken.jpg"]


def test_resize_keeps_the_format_and_leaves_images_already_the_right_size(tmp_path):
    src = tmp_path / "src"
    make_image(src / "trainA" / "small.png", seed=1, size=(10, 10))
    make_image(src / "trainA" / "wide.png", seed=2, size=(30, 20))
    write_shards(src, tmp_path / "out", resize=10)
    samples = {s["__key__"]: s for s in read_split(tmp_path / "out", "trainA")}
    assert samples["small"]["png"] == (src / "trainA" / "small.png").read_bytes()  # Nothing to do: bytes kept.
    with Image.open(io.BytesIO(samples["wide"]["png"])) as img:
        assert (img.format, img.size) == ("PNG", (10, 10))


def test_shuffle_seed_spreads_files_across_shards_deterministically(big_tree, tmp_path):
    plain = write_shards(big_tree, tmp_path / "plain", splits=["trainA"], maxcount=100, shuffle_seed=None)
    first = write_shards(big_tree, tmp_path / "s1", splits=["trainA"], maxcount=100, shuffle_seed=1, workers=2)
    again = write_shards(big_tree, tmp_path / "s1b", splits=["trainA"], maxcount=100, shuffle_seed=1)
    write_shards(big_tree, tmp_path / "s2", splits=["trainA"], maxcount=100, shuffle_seed=2)
    assert first["options"]["shuffle_seed"] == 1 and plain["options"]["shuffle_seed"] is None
    assert tars(tmp_path / "s1") == tars(tmp_path / "s1b") and first["splits"] == again["splits"]
    # Shuffled by default, with seed 0 recorded; the command's --no-shuffle keeps sorted order.
    default = write_shards(big_tree, tmp_path / "default", splits=["trainA"], maxcount=100)
    seed0 = write_shards(big_tree, tmp_path / "seed0", splits=["trainA"], maxcount=100, shuffle_seed=0)
    assert default["options"]["shuffle_seed"] == 0 and tars(tmp_path / "default") == tars(tmp_path / "seed0")
    assert seed0["splits"] == default["splits"]
    assert main([str(big_tree), str(tmp_path / "cli"), "--splits", "trainA", "--maxcount", "100", "--no-shuffle",
                 "--no-progress"]) == 0
    assert tars(tmp_path / "cli") == tars(tmp_path / "plain")
    order = {name: [s["name.txt"].decode() for s in read_split(tmp_path / name, "trainA")]
             for name in ("plain", "s1", "s2")}
    assert order["plain"] == sorted(order["plain"])
    assert order["s1"] != order["plain"] and order["s2"] != order["s1"]
    # The same samples under the same keys, whatever the seed.
    assert samples_of(tmp_path / "plain") == samples_of(tmp_path / "s1") == samples_of(tmp_path / "s2")
    # Each shard is a random subset: the first shard no longer holds only the first files.
    first_shard = {s["name.txt"].decode() for s in wds.WebDataset(
        str(tmp_path / "s1" / first["splits"]["trainA"]["shards"][0]["path"]), shardshuffle=False)}
    assert len(first_shard & set(order["plain"][:100])) < 30


def test_pipe_output_streams_shards_and_writes_the_manifest_last(tree, tmp_path):
    local = write_shards(tree, tmp_path / "local", maxcount=2)
    dest, log = tmp_path / "remote", tmp_path / "commands.log"
    command = f"pipe:echo {{path}} >> {log} && mkdir -p {dest}/$(dirname {{path}}) && cat > {dest}/{{path}}"
    piped = write_shards(tree, command, maxcount=2)
    assert piped["splits"] == local["splits"]  # sha256 computed while streaming equals the local files'.
    assert tars(dest) == tars(tmp_path / "local")
    assert json.loads((dest / "manifest.json").read_text()) == piped
    sent = log.read_text().split()
    assert sent[-1] == "manifest.json" and sorted(sent[:-1]) == sorted(tars(dest))
    assert main([str(tree), command.replace(str(dest), str(tmp_path / "cli")), "--splits", "testA"]) == 0
    assert (tmp_path / "cli" / "testA" / "testA-000000.tar").is_file()


def test_a_failing_pipe_command_names_the_shard_and_writes_no_manifest(tree, tmp_path, capsys):
    log = tmp_path / "commands.log"
    command = f"pipe:echo {{path}} >> {log}; cat > /dev/null; exit 3"
    with pytest.raises(ShardError, match=r"trainA/trainA-000000\.tar exited with code 3"):
        write_shards(tree, command)
    assert log.read_text().split() == ["trainA/trainA-000000.tar"]
    capsys.readouterr()
    assert main([str(tree), command]) == 1  # A failure, not a usage error.
    assert "exited with code 3" in capsys.readouterr().err
    assert main([str(tree), "pipe:cat > /dev/null"]) == 2
    assert "has no {path}" in capsys.readouterr().err


@pytest.fixture
def large_image(tmp_path) -> Path:
    """One noise PNG of about 480 kB: several times what a pipe and its write buffer hold."""
    src = tmp_path / "large"
    (src / "trainA").mkdir(parents=True)
    pixels = np.random.default_rng(3).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src / "trainA" / "noise.png")
    return src


@pytest.mark.parametrize("early_exit", ["exit 0", "head -c 1 > /dev/null"])
def test_a_pipe_command_that_exits_0_without_reading_everything_is_an_error(large_image, tmp_path, capsys,
                                                                            early_exit):
    log = tmp_path / "commands.log"
    command = f"pipe:echo {{path}} >> {log}; {early_exit}"
    with pytest.raises(ShardError, match=r"trainA/trainA-000000\.tar exited \(code 0\) before reading all of its "
                                         rf"input: echo trainA/trainA-000000\.tar >> .*; {re.escape(early_exit)}$"):
        write_shards(large_image, command, progress=True)
    assert log.read_text().split() == ["trainA/trainA-000000.tar"]  # Neither recorded as sent nor a manifest.
    assert "sharding trainA: 1/1 files" in capsys.readouterr().err  # The progress line is ended on failure too.


def test_an_interrupted_pipe_upload_is_killed_whole_and_never_completed(large_image, tmp_path):
    # A compound command whose last process renames the upload into place when its input ends, as `aws s3 cp -`
    # completes one. After 512 bytes it interrupts the shard writer (its parent) and reads on.
    dest = tmp_path / "remote"
    final = f"{shlex.quote(str(dest))}/{{path}}"
    command = (f"pipe:mkdir -p $(dirname {final}) && {{ head -c 512; kill -INT $PPID; cat; }} | "
               f"{{ cat > {final}.part && mv {final}.part {final}; }}")
    code = ("import signal, sys\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)  # Even if SIGINT is ignored by the caller.\n"
            "from pipeline.shards import main\n"
            f"sys.exit(main([{str(large_image)!r}, {command!r}, '--no-progress']))\n")
    # Read until every process holding the output has exited: the command's ones too, if any outlive the writer.
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=60)
    assert result.returncode != 0 and "KeyboardInterrupt" in result.stdout
    assert (dest / "trainA" / "trainA-000000.tar.part").is_file()  # It had started...
    assert not (dest / "trainA" / "trainA-000000.tar").exists()  # ...and was killed before it could finish.
    assert not (dest / "manifest.json").exists()


def test_progress_shows_files_per_second_and_eta(tree, tmp_path, capsys):
    meter = shards.Progress(200, stream=io.StringIO(), every_s=0)
    meter.update(50, label="trainA")
    assert re.fullmatch(r"trainA: 50/200 files \(25%\), [\d,]+ files/s, ETA \d+:\d\d:\d\d", meter.line())
    assert main([str(tree), str(tmp_path / "out"), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"sharding testB: 14/14 files \(100%\), [\d,]+ files/s, ETA 0:00:00", err)
    assert main([str(tree), str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "files/s" not in capsys.readouterr().err


def test_bad_encoding_options_and_mixed_options_are_refused(tree, tmp_path):
    with pytest.raises(ShardError, match="quality"):
        write_shards(tree, tmp_path / "out", quality=0)
    with pytest.raises(ShardError, match="unknown format 'gif'"):
        write_shards(tree, tmp_path / "out", format="gif")
    write_shards(tree, tmp_path / "out")
    # Re-sharding only testA at another size would mix sizes in one output: refused, nothing removed.
    before = tars(tmp_path / "out")
    with pytest.raises(ShardError, match="keeps split"):
        write_shards(tree, tmp_path / "out", splits=["testA"], resize=8, overwrite=True)
    assert tars(tmp_path / "out") == before and load_manifest(tmp_path / "out")


# --- inspect --------------------------------------------------------------------------------------------------


def test_inspect_reports_counts_sizes_and_a_clean_manifest(tree, tmp_path, capsys):
    from pipeline.data.shard_inspect import inspect_shards

    out = tmp_path / "out"
    manifest = write_shards(tree, out, maxcount=2)
    report = inspect_shards(str(out / "trainA" / "*.tar"))
    assert report.ok and report.manifest_path == str((out / "manifest.json").resolve())
    assert [s.samples for s in report.shards] == [s["count"] for s in manifest["splits"]["trainA"]["shards"]]
    assert all(s.manifest == "ok" and s.decoded == s.samples for s in report.shards)
    assert report.skipped_at_sharding == 1
    widths = [20 + 3 * i for i in range(5)]
    assert report.size_stats()["width"] == (min(widths), 26, max(widths))
    assert main(["inspect", str(out / "train{A,B}" / "*.tar"), "--workers", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "5 shard(s), 9 samples" in stdout and "OK: no problems found" in stdout and "width 20 / " in stdout
    # --sample decodes that many per shard; the counts still cover everything.
    sampled = inspect_shards(f"{out}/trainA/trainA-{{000000..000002}}.tar", sample=1)
    assert [s.decoded for s in sampled.shards] == [1, 1, 1] and sampled.samples == 5 and sampled.ok


def test_inspect_finds_a_corrupt_member(tree, tmp_path, capsys):
    good = (tree / "trainA" / "001.jpg").read_bytes()
    path = tmp_path / "loose" / "bad-000000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for name, data in [("ok.jpg", good), ("ok.name.txt", b"ok.jpg"), ("cut.jpg", good[: len(good) // 2]),
                           ("cut.name.txt", b"cut.jpg"), ("noimage.name.txt", b"?")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(["inspect", str(path)]) == 1
    stdout = capsys.readouterr().out
    assert "cut.jpg (key cut)" in stdout and "truncated" in stdout.lower()
    assert "noimage" in stdout and "no image member" in stdout
    assert "no manifest found" in stdout and "PROBLEMS (2)" in stdout


def test_inspect_finds_shards_that_differ_from_the_manifest(tree, tmp_path, capsys):
    from pipeline.data.shard_inspect import inspect_shards

    out = tmp_path / "out"
    manifest = write_shards(tree, out, maxcount=2, shuffle_seed=None)
    # Change one byte of a name.txt member: the tar and its images stay valid, only the sha256 differs.
    changed = out / manifest["splits"]["trainB"]["shards"][1]["path"]
    data = bytearray(changed.read_bytes())
    index = data.index(b"b2.webp", 1024)  # The member's content, not its header name.
    data[index] = ord("c")
    changed.write_bytes(bytes(data))
    # And a shard the manifest does not list.
    (out / "trainB" / "trainB-000099.tar").write_bytes((out / "trainB" / "trainB-000000.tar").read_bytes())
    report = inspect_shards(str(out / "trainB" / "*.tar"))
    assert [s.manifest for s in report.shards] == ["ok", "mismatch", "not listed"]
    assert not report.corrupt and not report.ok
    assert any("trainB-000001.tar: differs from" in p and "sha256" in p for p in report.problems)
    assert main(["inspect", str(out / "trainB" / "*.tar"), "--json", str(tmp_path / "report.json")]) == 1
    assert "mismatch" in capsys.readouterr().out
    saved = json.loads((tmp_path / "report.json").read_text())
    assert not saved["ok"] and len(saved["problems"]) == 2
    # A truncated shard is unreadable, and a pattern that matches nothing is a usage error.
    changed.write_bytes(bytes(data[:1500]))
    assert any("unreadable" in p for p in inspect_shards(str(changed)).problems)
    assert main(["inspect", str(tmp_path / "nothing" / "*.tar")]) == 2
    assert "matches no file" in capsys.readouterr().err
