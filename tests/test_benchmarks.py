"""CI smoke of every benchmark: each runs on a tiny case and writes its JSON (no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest
from support.runs import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,keys", [
    ("bench_step.py", {"case", "impl", "seconds", "flops", "speedup"}),
    ("bench_data.py", {"format", "workers", "images_per_s", "per_worker"}),
    ("bench_ddp.py", {"world_size", "seconds_per_step", "images_per_s", "peak_rss_gb_per_rank"}),
    ("bench_shards.py", {"stage", "variant", "workers", "rate", "unit", "speedup"}),
    ("ema_vs_raw.py", {"seed", "raw_l1", "ema_l1", "identity_l1", "ratio"}),
    ("tiled_memory.py", {"mode", "tile", "seconds", "peak_rss_gb", "added_rss_gb"}),
    ("methods_quality.py", {"method", "steps", "seconds", "l1", "l1_identity", "ssim", "ssim_identity"}),
])
def test_benchmark_smoke(tmp_path, script, keys):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(keys <= set(row) for row in rows)
    assert all(row.get("seconds", 1) > 0 for row in rows)


def test_step_benchmark_exercises_the_gpu_settings_on_cpu(tmp_path):
    """bf16 autocast, channels_last and torch.compile (eager backend) through the benchmark's own code path."""
    out = tmp_path / "gpu-path.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--smoke", "--json", str(out),
                           "--precisions", "bf16,fp16", "--channels-last", "both", "--no-reference"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["precision"], r["channels_last"]) for r in rows} == {("bf16", False), ("bf16", True),
                                                                     ("fp16", False), ("fp16", True)}


def test_step_benchmark_compares_the_methods(tmp_path):
    out = tmp_path / "methods.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--smoke", "--json", str(out),
                           "--methods", "cyclegan,cut,fastcut", "--no-reference"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"cyclegan", "cut", "fastcut"} and rows["cyclegan"]["vs_cyclegan"] == 1.0
    assert all(r["vs_cyclegan"] > 0 for r in rows.values())


def test_gpu_check_runs_its_cpu_part_and_says_what_it_skipped(tmp_path):
    """`make gpu-check` without CUDA (hidden here even on a GPU machine): every part that does not need CUDA runs
    on the small case, the gpu tests are collected and skipped, and the skipped parts are named."""
    from gpu_check import cpu_plan

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    outcomes = report["tests"]["outcomes"]
    assert len(outcomes) >= 8 and set(outcomes.values()) == {"skipped"}
    assert any("test_resume_on_cuda" in name for name in outcomes)
    assert f"gpu tests ({len(outcomes)}): collected and skipped, no CUDA" in report["skipped"]
    assert any(s.startswith("CUDA graphs") for s in report["skipped"])
    plan = cpu_plan()
    assert [r["setting"] for r in report["step"]] == [s.name for s in plan.eager]
    assert all("error" not in r and r["seconds"] > 0 and r["images_per_s"] > 0 for r in report["step"])
    assert all(r.get("vs_reference", 1) > 0 for r in report["step"][1:])
    assert [r["setting"] for r in report["compile"]] == [s.name for s in plan.compiled]
    assert all("error" not in r for r in report["compile"])
    assert report["profile"]["top"] and report["profile"]["top"][0]["ms_per_step"] > 0
    assert [r["workers"] for r in report["loader"]] == plan.loader_workers
    assert all(r["margin"] > 0 for r in report["loader"])
    table = proc.stdout[proc.stdout.index("part    item"):]
    assert all(part in table for part in ("\ntests ", "\nstep ", "\ncompile ", "\nprofile ", "\nloader ",
                                          "\nskipped "))
