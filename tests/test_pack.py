"""Checkpoint formats across versions and commands: the landed single file resumes and translates, a checkpoint
directory packs into one generators file that translates the same, crafted files run no code in any command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.crafted import RunsCode, crafted_directories
from support.runs import ROOT, process_env, tiny_overrides, train_cmd

from pipeline.engine.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from pipeline.pack import main as pack
from pipeline.translate import main as translate

# Written by the landed code (commit 5635b11) before checkpoints became directories: a 1-process tiny run of 4
# steps (the conftest shards, tiny_overrides, train.ema_decay=0.9), kept as it was written.
LANDED = ROOT / "tests" / "assets" / "landed-5635b11" / "ckpt-000000004.pt"


def images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").rglob("*.png"))}


def test_a_checkpoint_of_the_landed_version_resumes_and_translates(shards, tmp_path, capsys):
    landed = load_checkpoint(LANDED)
    assert landed["format"] == "cyclegan-pipeline/1" and landed["step"] == 4 and len(landed["ranks"]) == 1
    args = tiny_overrides(shards, tmp_path / "run", **{"train.steps": 6, "checkpoint.every_steps": 2,
                                                       "train.ema_decay": 0.9, "checkpoint.resume": str(LANDED),
                                                       "report.sample_every_steps": 0})
    proc = subprocess.run(train_cmd(0, args), env=process_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {LANDED} (step 4)" in proc.stderr and "no generator EMA" not in proc.stderr
    resumed = load_checkpoint(checkpoint_path(tmp_path / "run", 6))
    assert resumed["format"] == "cyclegan-pipeline/2" and resumed["step"] == 6 and resumed["images_seen"] == 6
    assert resumed["ema"]["started"] and len(resumed["ranks"][0]["pool_a"]["images"]) == 2
    # The landed file translates as it did.
    assert translate(["--checkpoint", str(LANDED), "--input", shards["testA"], "--output", str(tmp_path / "out"),
                      "--device", "cpu"]) == 0
    assert len(images(tmp_path / "out")) == 8


def test_pack_writes_one_generators_file_that_translates_like_its_checkpoint(shards, tmp_path, capsys):
    args = tiny_overrides(shards, tmp_path / "run", **{"train.steps": 2, "checkpoint.every_steps": 2,
                                                       "train.ema_decay": 0.9, "report.sample_every_steps": 0})
    assert subprocess.run(train_cmd(0, args), env=process_env(), cwd=tmp_path, capture_output=True).returncode == 0
    [(_, directory)] = list_checkpoints(tmp_path / "run")
    out = tmp_path / "shared" / "g.pt"
    assert pack([str(directory), str(out)]) == 0
    assert "G_ab, G_ba (raw and EMA) of step 2" in capsys.readouterr().out
    packed = torch.load(out, weights_only=True)
    full = load_checkpoint(directory)
    assert packed["kind"] == "generators" and set(packed["nets"]) == {"G_ab", "G_ba"} and "ranks" not in packed
    assert packed["config"] == full["config"] and packed["step"] == 2
    for name in ("G_ab", "G_ba"):
        for key, value in full["ema"]["nets"][name].items():
            assert torch.equal(packed["ema"]["nets"][name][key], value)
    assert out.stat().st_size < sum(p.stat().st_size for p in directory.iterdir()) / 2
    for source, name in ((directory, "dir"), (out, "file")):
        assert translate(["--checkpoint", str(source), "--input", shards["testA"], "--output",
                          str(tmp_path / name), "--device", "cpu"]) == 0
    a, b = images(tmp_path / "dir"), images(tmp_path / "file")
    assert a.keys() == b.keys() and len(a) == 8 and all(np.array_equal(a[k], b[k]) for k in a)
    # A generators file is for translation, not for resuming: the error says which file to take instead.
    again = subprocess.run(train_cmd(0, [*args, f"checkpoint.resume={out}"]), env=process_env(), cwd=tmp_path,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "is a generators file" in again.stderr and "Traceback" not in again.stderr
    assert pack([str(tmp_path / "nothing"), str(tmp_path / "x.pt")]) == 2


@pytest.mark.parametrize("command", ["resume", "translate", "evaluate"])
def test_crafted_checkpoints_run_no_code_in_any_command(shards, tmp_path, command):
    crafted = list(crafted_directories(tmp_path / "crafted").values())
    single = tmp_path / "single" / "ckpt-000000001.pt"
    single.parent.mkdir()
    torch.save({"format": "cyclegan-pipeline/1", "step": 1, "evil": RunsCode()}, single)
    for path in [*crafted, single]:
        if command == "resume":
            cmd = train_cmd(0, tiny_overrides(shards, tmp_path / "run", **{"checkpoint.resume": str(path)}))
        elif command == "translate":
            cmd = [sys.executable, "-m", "pipeline.translate", "--checkpoint", str(path), "--input",
                   shards["testA"], "--output", str(tmp_path / "out")]
        else:
            cmd = [sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(path), "--no-mlflow"]
        proc = subprocess.run(cmd, env=process_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (path, proc.stderr[-2000:])
        assert not (tmp_path / "pwned").exists(), path
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
