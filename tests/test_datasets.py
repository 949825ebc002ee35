"""datasets/cyclegan_sets.py against a real HTTP server on 127.0.0.1: resumed downloads, verification, the
reference layout, shards, a train.yaml that trains, and the shipped configs of every set."""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import dataset_scripts
from support.runs import ROOT, tiny_overrides

from pipeline.config import load_config
from pipeline.data.shards import load_manifest

NAME = "horse2zebra"


def load_recipe():
    return dataset_scripts.load("cyclegan_sets")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


def make_zip(synthetic, folder: Path, name: str = NAME, drop: str | None = None, train: int = 10) -> bytes:
    """A small set in the reference's zip layout: <name>/trainA/..., plus the macOS junk real zips carry."""
    src = folder / "src"
    synthetic.make_synthetic(src, train=train, test=3, size=40, seed=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(src.rglob("*.png")):
            relative = path.relative_to(src).as_posix()
            if drop and relative.startswith(drop + "/"):
                continue
            archive.write(path, f"{name}/{relative}")
        archive.writestr(f"__MACOSX/{name}/._trainA", b"junk")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours 'Range: bytes=N-' (unless server.ranges is False); cuts a response short
    (closing the connection) after server.cuts.pop(0) bytes while that list is not empty.

    server.etag and server.last_modified are sent when set, and an If-Range that matches neither (a weak ETag
    never matches) gets the whole file, unless server.if_range is False (then the Range is served regardless).
    server.lengths False sends no Content-Length (and '*' as the Content-Range total); server.content_range
    replaces the Content-Range of 206 answers. server.if_ranges records each request's If-Range."""

    def do_GET(self):  # noqa: N802 - the http.server API
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        server.if_ranges.append(self.headers.get("If-Range"))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges and self.if_range_holds():
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            total = len(data) if server.lengths else "*"
            self.send_header("Content-Range", server.content_range or f"bytes {start}-{len(data) - 1}/{total}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        if server.etag:
            self.send_header("ETag", server.etag)
        if server.last_modified:
            self.send_header("Last-Modified", server.last_modified)
        if server.lengths:
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cuts:
            body = body[: server.cuts.pop(0)]  # The connection then closes: the client sees a short body.
        self.wfile.write(body)

    def if_range_holds(self) -> bool:
        value, server = self.headers.get("If-Range"), self.server
        if value is None or not server.if_range:
            return True
        strong = server.etag if server.etag and not server.etag.startswith("W/") else None
        return value in (strong, server.last_modified) and value is not None

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.cuts, httpd.ranges = {}, [], [], True
    httpd.etag = httpd.last_modified = httpd.content_range = None
    httpd.if_range, httpd.lengths, httpd.if_ranges = True, True, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/sets"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def run_recipe(recipe, server, root, *extra):
    return recipe.main([NAME, "--base-url", server.url, "--root", str(root), "--workers", "1", "--retries", "0",
                        "--retry-wait", "0", "--timeout", "10", "--no-progress", *extra])


def test_interrupted_download_resumes_then_shards_and_trains(recipe, synthetic, server, tmp_path, capsys, shards):
    data = make_zip(synthetic, tmp_path)
    server.files[f"/sets/{NAME}.zip"] = data
    cut = len(data) // 3
    server.cuts = [cut]
    root = tmp_path / "data"
    set_dir = root / NAME

    # First run: the connection drops after a third of the file. Nothing looks complete; the bytes are kept.
    assert run_recipe(recipe, server, root) == 1
    err = capsys.readouterr().err
    assert f"{server.url}/{NAME}.zip" in err and "run the same command again to resume" in err
    assert (set_dir / f"{NAME}.zip.part").stat().st_size == cut
    assert not (set_dir / f"{NAME}.zip").exists() and not (set_dir / "images").exists()
    assert not (set_dir / "shards" / "manifest.json").exists()

    # Second run: resumes with a Range request from the partial size, verifies, extracts, shards.
    assert run_recipe(recipe, server, root) == 0
    assert server.requests == [(f"/sets/{NAME}.zip", None), (f"/sets/{NAME}.zip", f"bytes={cut}-")]
    out = capsys.readouterr().out
    assert "resuming" in out and "CRCs ok" in out and "trainA 10, trainB 10, testA 3, testB 3" in out
    assert "train counts differ from the reference's" in out  # 10/10 is not horse2zebra's 1,067/1,334.
    assert not (set_dir / f"{NAME}.zip").exists() and not (set_dir / f"{NAME}.zip.part").exists()
    manifest = load_manifest(set_dir / "shards")
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"trainA": 10, "trainB": 10, "testA": 3,
                                                                      "testB": 3}
    assert sorted(p.name for p in (set_dir / "images").iterdir()) == ["testA", "testB", "trainA", "trainB"]

    # train.yaml: the set's config with absolute shard paths and steps from the counts; it trains.
    train_yaml = set_dir / "train.yaml"
    cfg = load_config([train_yaml])
    assert cfg.train.steps == 200 * 10 and cfg.run_dir == f"runs/{NAME}"
    assert cfg.data.train_a == str((set_dir / "shards").resolve() / "trainA" / "trainA-000000.tar")
    assert f"python -m pipeline.train --config {train_yaml}" in out
    overrides = [o for o in tiny_overrides(shards, tmp_path / "run", **{"train.steps": 2, "tracking.enabled": False,
                                                                      "checkpoint.every_steps": 2})
                 if not o.startswith(("data.train_", "data.test_"))]
    from pipeline.train.loop import run

    result = run(load_config([train_yaml], overrides))
    assert result.step == 2 and (tmp_path / "run" / "ckpt-000000002").is_dir()

    # Third run: complete, so nothing is downloaded or rewritten.
    before = (set_dir / "shards" / "manifest.json").stat().st_mtime_ns
    assert run_recipe(recipe, server, root) == 0
    assert len(server.requests) == 2 and "already complete" in capsys.readouterr().out
    assert (set_dir / "shards" / "manifest.json").stat().st_mtime_ns == before


def test_a_retry_in_the_same_run_resumes(recipe, synthetic, server, tmp_path):
    data = make_zip(synthetic, tmp_path)
    server.files[f"/sets/{NAME}.zip"] = data
    server.cuts = [1000]
    assert run_recipe(recipe, server, tmp_path / "data", "--retries", "2") == 0
    assert [r for _, r in server.requests] == [None, "bytes=1000-"]
    assert load_manifest(tmp_path / "data" / NAME / "shards")["splits"]["trainB"]["count"] == 10


def test_a_server_that_ignores_range_restarts_the_download(recipe, synthetic, server, tmp_path, capsys):
    data = make_zip(synthetic, tmp_path)
    server.files[f"/sets/{NAME}.zip"] = data
    server.cuts, server.ranges = [5000], False
    assert run_recipe(recipe, server, tmp_path / "data") == 1
    assert run_recipe(recipe, server, tmp_path / "data") == 0
    assert [r for _, r in server.requests] == [None, "bytes=5000-"]  # Asked to resume, got a 200: from zero.
    assert "starting over" in capsys.readouterr().out
    assert load_manifest(tmp_path / "data" / NAME / "shards")["splits"]["trainA"]["count"] == 10


def counts_of(root: Path, name: str = NAME) -> dict[str, int]:
    return {s: e["count"] for s, e in load_manifest(root / name / "shards")["splits"].items()}


@pytest.mark.parametrize("server_honours_if_range", [True, False])
def test_a_file_changed_on_the_server_restarts_instead_of_splicing(recipe, synthetic, server, tmp_path, capsys,
                                                                   server_honours_if_range):
    old, new = make_zip(synthetic, tmp_path / "old"), make_zip(synthetic, tmp_path / "new", train=12)
    assert len(old) != len(new)
    path, cut = f"/sets/{NAME}.zip", len(old) // 3
    server.files[path], server.etag, server.cuts = old, '"old"', [cut]
    server.if_range = server_honours_if_range
    assert run_recipe(recipe, server, tmp_path / "data") == 1
    server.files[path], server.etag = new, '"new"'
    assert run_recipe(recipe, server, tmp_path / "data") == 0
    out = capsys.readouterr().out
    if server_honours_if_range:  # The old ETag no longer matches: the server sends the new file whole.
        assert server.requests == [(path, None), (path, f"bytes={cut}-")]
        assert server.if_ranges == [None, '"old"'] and "sent the whole file" in out
    else:  # The server serves the Range of the new file: its other length shows the change.
        assert server.requests == [(path, None), (path, f"bytes={cut}-"), (path, None)]
        assert f"the file on the server changed ({len(new):,} bytes now, {len(old):,} before)" in out
    assert counts_of(tmp_path / "data") == {"trainA": 12, "trainB": 12, "testA": 3, "testB": 3}


def test_a_weak_etag_is_never_sent_in_if_range(recipe, synthetic, server, tmp_path, capsys):
    data = make_zip(synthetic, tmp_path)
    modified = "Mon, 02 Jan 2023 03:04:05 GMT"
    server.files[f"/sets/{NAME}.zip"], server.cuts = data, [2000]
    server.etag, server.last_modified = 'W/"weak"', modified
    assert run_recipe(recipe, server, tmp_path / "data") == 1
    assert run_recipe(recipe, server, tmp_path / "data") == 0
    assert [r for _, r in server.requests] == [None, "bytes=2000-"] and server.if_ranges == [None, modified]
    assert "resuming" in capsys.readouterr().out


def test_a_complete_part_is_verified_without_downloading_it_again(recipe, synthetic, server, tmp_path, capsys):
    data = make_zip(synthetic, tmp_path)
    server.files[f"/sets/{NAME}.zip"] = data
    # All bytes arrived, then the run stopped before verifying. The .part.json of the response that started it
    # (the recipe's own format) says how long the file is: no request at all.
    part = tmp_path / "data" / NAME / f"{NAME}.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    part.with_name(part.name + ".json").write_text(json.dumps({"url": f"{server.url}/{NAME}.zip", "total": len(data),
                                                               "etag": None, "last_modified": None}))
    assert run_recipe(recipe, server, tmp_path / "data") == 0
    assert server.requests == [] and counts_of(tmp_path / "data")["trainA"] == 10
    assert not part.exists() and not part.with_name(part.name + ".json").exists()

    # A damaged .part.json counts as none: the Range request past the end gets a 416 naming this length.
    part = tmp_path / "again" / NAME / f"{NAME}.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    part.with_name(part.name + ".json").write_text('{"url": "http://')
    assert run_recipe(recipe, server, tmp_path / "again") == 0
    assert server.requests == [(f"/sets/{NAME}.zip", f"bytes={len(data)}-")]
    assert "HTTP 416 names that length" in capsys.readouterr().out
    assert counts_of(tmp_path / "again")["trainA"] == 10


def test_an_unusable_content_range_restarts_from_zero(recipe, synthetic, server, tmp_path, capsys):
    server.files[f"/sets/{NAME}.zip"], server.cuts = make_zip(synthetic, tmp_path), [3000]
    assert run_recipe(recipe, server, tmp_path / "data") == 1
    server.content_range = "bytes three-thousand"
    assert run_recipe(recipe, server, tmp_path / "data") == 0
    assert [r for _, r in server.requests] == [None, "bytes=3000-", None]
    assert "'bytes three-thousand' is unusable; starting over" in capsys.readouterr().out
    assert counts_of(tmp_path / "data")["trainB"] == 10


def test_a_server_that_sends_no_length_keeps_the_bytes_to_resume(recipe, synthetic, server, tmp_path, capsys):
    server.files[f"/sets/{NAME}.zip"], server.cuts, server.lengths = make_zip(synthetic, tmp_path), [4000], False
    assert run_recipe(recipe, server, tmp_path / "data") == 1
    err = capsys.readouterr().err
    assert "announced no length" in err and "run the same command again to resume" in err
    assert (tmp_path / "data" / NAME / f"{NAME}.zip.part").stat().st_size == 4000
    assert run_recipe(recipe, server, tmp_path / "data") == 0
    assert [r for _, r in server.requests] == [None, "bytes=4000-"]
    assert counts_of(tmp_path / "data")["trainA"] == 10


def test_a_zip_found_in_place_is_verified_and_never_removed(recipe, synthetic, server, tmp_path, capsys):
    root = tmp_path / "data"
    (root / NAME).mkdir(parents=True)
    (root / "facades").mkdir()
    damaged = bytearray(make_zip(synthetic, tmp_path / "h"))
    damaged[damaged.index(b"horse2zebra/trainA/00003.png") + 200] ^= 0xFF
    (root / NAME / f"{NAME}.zip").write_bytes(bytes(damaged))
    good = make_zip(synthetic, tmp_path / "f", name="facades")
    (root / "facades" / "facades.zip").write_bytes(good)
    args = ["--base-url", server.url, "--root", str(root), "--workers", "1", "--no-progress"]
    # The damaged one is named, kept and explained; the next set is still done, from its zip, without a request.
    assert recipe.main([NAME, "facades", *args]) == 1
    err = capsys.readouterr().err
    assert f"{root / NAME / NAME}.zip: member horse2zebra/trainA/00003.png fails its CRC check" in err
    assert "left there: delete it to download the set again" in err and "failed: horse2zebra" in err
    assert (root / NAME / f"{NAME}.zip").read_bytes() == damaged and not (root / NAME / "images").exists()
    assert server.requests == []
    assert (root / "facades" / "facades.zip").read_bytes() == good
    assert counts_of(root, "facades") == {"trainA": 10, "trainB": 10, "testA": 3, "testB": 3}


def test_a_corrupt_zip_is_refused_and_removed(recipe, synthetic, server, tmp_path, capsys):
    data = bytearray(make_zip(synthetic, tmp_path))
    member = data.index(b"horse2zebra/trainA/00003.png")  # Local header name; the PNG bytes follow it.
    data[member + 200] ^= 0xFF
    server.files[f"/sets/{NAME}.zip"] = bytes(data)
    assert run_recipe(recipe, server, tmp_path / "data", "--retries", "1") == 1
    err = capsys.readouterr().err
    assert "horse2zebra/trainA/00003.png fails its CRC check" in err and "download it afresh" in err
    assert not list((tmp_path / "data" / NAME).glob("*.zip*"))
    assert not (tmp_path / "data" / NAME / "images").exists()


def test_bad_names_urls_and_layouts_are_clear_errors(recipe, synthetic, server, tmp_path, capsys):
    assert recipe.main(["horse2zebr", "--root", str(tmp_path)]) == 2
    assert "did you mean 'horse2zebra'?" in capsys.readouterr().err

    # Counts no run can use: refused before any request.
    for flag, value in (("--maxcount", "0"), ("--workers", "0"), ("--retries", "-1")):
        assert run_recipe(recipe, server, tmp_path / "data", flag, value) == 2
        assert f"{flag} must be at least" in capsys.readouterr().err
    assert server.requests == []

    # A set the server does not have: the URL and the fix are named; no retry for a 404.
    assert run_recipe(recipe, server, tmp_path / "data", "--retries", "3") == 1
    err = capsys.readouterr().err
    assert f"{server.url}/{NAME}.zip answered HTTP 404" in err and "--base-url" in err
    assert len(server.requests) == 1

    # A zip without trainB: not the reference layout; nothing extracted is left in place (nor a stale
    # extraction of an interrupted run), and the zip is kept for the next run, which the message says.
    server.files[f"/sets/{NAME}.zip"] = make_zip(synthetic, tmp_path / "x", drop="trainB")
    (tmp_path / "data" / NAME / ".images.tmp" / "trainA").mkdir(parents=True)
    assert run_recipe(recipe, server, tmp_path / "data") == 1
    err = capsys.readouterr().err
    assert "not in the reference layout: trainB missing" in err and "is kept and reused by the next run" in err
    assert not (tmp_path / "data" / NAME / "images").exists()
    assert not (tmp_path / "data" / NAME / ".images.tmp").exists()
    assert (tmp_path / "data" / NAME / f"{NAME}.zip").is_file()

    # cityscapes is not offered by the reference (license): said before any request is made.
    assert recipe.main(["cityscapes", "--root", str(tmp_path / "data"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "license" in err and "prepare_cityscapes_dataset.py" in err and str(tmp_path / "data") in err


def test_a_local_mirror_with_shard_options_and_reruns_that_change_them(recipe, synthetic, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{NAME}.zip").write_bytes(make_zip(synthetic, tmp_path))
    root = tmp_path / "data"
    args = [NAME, "--base-url", str(mirror), "--root", str(root), "--workers", "1", "--no-progress"]
    assert recipe.main([*args, "--resize", "36", "--format", "jpeg", "--shuffle-seed", "4"]) == 0
    manifest = load_manifest(root / NAME / "shards")
    assert manifest["options"] == {"resize": 36, "format": "jpeg", "quality": 95, "shuffle_seed": 4, "maxcount": 1000,
                                   "maxsize": 10**9}
    assert (mirror / f"{NAME}.zip").is_file()  # A mirror's zip is read in place, never removed.
    assert "data.load_size is 286" in capsys.readouterr().out  # Resized to 36: training would resize again.

    # Other options: the complete set is re-sharded from images/, not skipped.
    assert recipe.main(args) == 0
    assert "already complete" not in capsys.readouterr().out
    assert load_manifest(root / NAME / "shards")["options"]["resize"] is None
    assert recipe.main(args) == 0
    assert "already complete" in capsys.readouterr().out

    # Another --maxcount is another set of shards too.
    assert recipe.main([*args, "--maxcount", "3"]) == 0
    assert "already complete" not in capsys.readouterr().out
    manifest = load_manifest(root / NAME / "shards")
    assert manifest["options"]["maxcount"] == 3
    assert [s["count"] for s in manifest["splits"]["trainA"]["shards"]] == [3, 3, 3, 1]
    assert recipe.main([*args, "--maxcount", "3"]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo",
                                  "cezanne2photo", "ukiyoe2photo", "vangogh2photo", "maps", "cityscapes", "facades",
                                  "iphone2dslr_flower"])
def test_every_set_has_a_config_that_reads_the_recipes_shards(recipe, name):
    assert name in recipe.NAMES
    cfg = load_config([ROOT / "configs" / f"{name}.yaml"])
    for key, split in (("train_a", "trainA"), ("train_b", "trainB"), ("test_a", "testA"), ("test_b", "testB")):
        assert cfg.data[key] == f"data/{name}/shards/{split}/*.tar"
    assert cfg.run_dir == f"runs/{name}"
    if name in recipe.EXPECTED_TRAIN:
        assert cfg.train.steps == 200 * max(recipe.EXPECTED_TRAIN[name])
    else:
        assert "not recorded" in (ROOT / "configs" / f"{name}.yaml").read_text()
