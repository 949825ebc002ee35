"""datasets/cyclegan_sets.py against a real HTTP server on 127.0.0.1: resumed downloads, verification, the
reference layout, shards, a train.yaml that trains, and the shipped configs of every set."""

from __future__ import annotations

import importlib.util
import io
import re
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

from pipeline.config import load_config
from pipeline.shards import load_manifest

NAME = "horse2zebra"


def load_recipe():
    """datasets/ holds scripts, not a package: load the recipe by path."""
    spec = importlib.util.spec_from_file_location("cyclegan_sets", ROOT / "datasets" / "cyclegan_sets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cyclegan_sets"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


def make_zip(synthetic, folder: Path, name: str = NAME, drop: str | None = None) -> bytes:
    """A small set in the reference's zip layout: <name>/trainA/..., plus the macOS junk real zips carry."""
    src = folder / "src"
    synthetic.make_synthetic(src, train=10, test=3, size=40, seed=2)
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
    (closing the connection) after server.cuts.pop(0) bytes while that list is not empty."""

    def do_GET(self):  # noqa: N802 - the http.server API
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cuts:
            body = body[: server.cuts.pop(0)]  # The connection then closes: the client sees a short body.
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.cuts, httpd.ranges = {}, [], [], True
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
    from pipeline.train import run

    result = run(load_config([train_yaml], overrides))
    assert result.step == 2 and (tmp_path / "run" / "ckpt-000000002.pt").is_file()

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

    # A set the server does not have: the URL and the fix are named; no retry for a 404.
    assert run_recipe(recipe, server, tmp_path / "data", "--retries", "3") == 1
    err = capsys.readouterr().err
    assert f"{server.url}/{NAME}.zip answered HTTP 404" in err and "--base-url" in err
    assert len(server.requests) == 1

    # A zip without trainB: not the reference layout; nothing extracted is left in place.
    server.files[f"/sets/{NAME}.zip"] = make_zip(synthetic, tmp_path / "x", drop="trainB")
    assert run_recipe(recipe, server, tmp_path / "data") == 1
    assert "not in the reference layout: trainB missing" in capsys.readouterr().err
    assert not (tmp_path / "data" / NAME / "images").exists()

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
    assert manifest["options"] == {"resize": 36, "format": "jpeg", "quality": 95, "shuffle_seed": 4}
    assert (mirror / f"{NAME}.zip").is_file()  # A mirror's zip is read in place, never removed.
    assert "data.load_size is 286" in capsys.readouterr().out  # Resized to 36: training would resize again.

    # Other options: the complete set is re-sharded from images/, not skipped.
    assert recipe.main(args) == 0
    assert "already complete" not in capsys.readouterr().out
    assert load_manifest(root / NAME / "shards")["options"]["resize"] is None
    assert recipe.main(args) == 0
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
