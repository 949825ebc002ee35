"""CI smoke of every benchmark: each runs on a tiny case and writes its JSON (no timing is asserted)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.runs import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import run_child  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,keys", [
    ("bench_step.py", {"case", "impl", "seconds", "flops", "speedup"}),
    ("bench_data.py", {"format", "workers", "images_per_s", "per_worker"}),
    ("bench_ddp.py", {"world_size", "seconds_per_step", "images_per_s", "peak_rss_gb_per_rank"}),
    ("bench_shards.py", {"stage", "variant", "workers", "rate", "unit", "speedup"}),
    ("ema_vs_raw.py", {"seed", "raw_l1", "ema_l1", "identity_l1", "ratio"}),
    ("tiled_memory.py", {"mode", "tile", "seconds", "peak_rss_gb", "added_rss_gb"}),
    ("methods_quality.py", {"seed", "method", "steps", "seconds", "of_budget", "l1", "l1_identity", "ssim",
                            "ssim_identity"}),
    ("bench_resume.py", {"source", "design", "step", "bytes_read", "reads", "seconds_to_first_batch"}),
    ("bench_eval.py", {"world_size", "rank", "images", "decoded", "translated", "seconds", "peak_rss_mb"}),
    ("colour_tasks.py", {"transform", "variant", "seed", "l1", "l1_identity", "ssim", "ssim_identity",
                         "cycle_curve"}),
    ("beyond_rgb.py", {"task", "method", "seed", "l1", "l1_identity", "ssim", "ssim_identity"}),
    ("bench_checkpoint.py", {"design", "world_size", "bytes_written_max_rank", "rank0_peak_rss", "blocked_s",
                             "durable_s", "resume_bytes_read_max_rank"}),
])
def test_benchmark_smoke(tmp_path, script, keys):
    out = tmp_path / "result.json"
    extra = ["--eval-every", "3"] if script == "colour_tasks.py" else []
    proc = run_child([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out), *extra],
                     cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(keys <= set(row) for row in rows)
    assert all(row.get("seconds", 1) > 0 for row in rows)
    if script == "bench_resume.py":
        # Bytes, not times: replay reads what the run consumed, the stream state what the buffers held.
        growth = json.loads(out.read_text())["growth_4s_over_s"]
        assert all(growth[f"{where}/state"] < growth[f"{where}/replay"] for where in ("local", "http"))
    if script == "bench_eval.py":
        by = {(r["world_size"], r["rank"]): r for r in rows}
        assert by[1, 0]["decoded"] == 2 * by[1, 0]["images"]  # One process decodes both sets whole.
        assert sum(by[2, r]["decoded"] for r in (0, 1)) == by[1, 0]["decoded"]  # Two ranks split them.
    if script == "colour_tasks.py":
        # The colour transfer's own identity L1 (numpy on the PNGs) equals the pipeline's evaluation of the same
        # held-out pairs; fitted on the cast's unpaired pixels, the affine map lands below the input unchanged.
        by = {r["variant"]: r for r in rows}
        assert by["transfer"]["l1_identity"] == pytest.approx(by["colour"]["l1_identity"], abs=1e-6)
        assert by["transfer"]["l1"] < by["transfer"]["l1_identity"]
        # The preset starts as that transfer (fitted by the pipeline from the shards): below identity from the start.
        assert by["colour"]["l1"] < by["colour"]["l1_identity"]
        # --eval-every: the held-out L1 along the run, its last point the final evaluation.
        curve = by["colour"]["l1_curve"]
        assert [step for step, _ in curve] == [3, 6] and curve[-1][1] == by["colour"]["l1"]
        # --merge: a rerun of one variant keeps the other variants' rows of the earlier file.
        again = tmp_path / "again.json"
        proc = run_child([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--variants", "transfer",
                          "--merge", str(out), "--json", str(again)], cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        merged = json.loads(again.read_text())["rows"]
        assert [r for r in merged if r["variant"] != "transfer"] == [r for r in rows if r["variant"] != "transfer"]
        assert [r["variant"] for r in merged].count("transfer") == 1
    if script == "bench_checkpoint.py":
        # Bytes, not times: the landed design's rank 0 writes every rank's pools, the sharded one's its own share.
        by = {(r["design"], r["world_size"]): r for r in rows}
        assert by["landed", 2]["bytes_written_rank0"] > by["landed", 1]["bytes_written_rank0"]
        assert by["sharded", 2]["bytes_written_max_rank"] <= by["sharded", 1]["bytes_written_max_rank"]
        assert by["sharded", 2]["resume_bytes_read_max_rank"] < 1.15 * by["sharded", 1]["resume_bytes_read_max_rank"]


def test_step_benchmark_exercises_the_gpu_settings_on_cpu(tmp_path):
    """bf16 autocast, channels_last and torch.compile (eager backend) through the benchmark's own code path."""
    out = tmp_path / "gpu-path.json"
    proc = run_child([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--smoke", "--json", str(out),
                      "--precisions", "bf16,fp16", "--channels-last", "both", "--no-reference"], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["precision"], r["channels_last"]) for r in rows} == {("bf16", False), ("bf16", True),
                                                                     ("fp16", False), ("fp16", True)}


def test_step_benchmark_compares_the_methods(tmp_path):
    out = tmp_path / "methods.json"
    proc = run_child([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--smoke", "--json", str(out),
                      "--methods", "cyclegan,cut,fastcut", "--no-reference"], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"cyclegan", "cut", "fastcut"} and rows["cyclegan"]["vs_cyclegan"] == 1.0
    assert all(r["vs_cyclegan"] > 0 for r in rows.values())


def test_gpu_check_runs_its_cpu_part_and_says_what_it_skipped(tmp_path):
    """`make gpu-check` without CUDA (hidden here even on a GPU machine): every part that does not need CUDA runs
    on the small case, the gpu tests are collected and skipped, and the skipped parts are named."""
    from gpu_check import cpu_plan

    out = tmp_path / "gpu_check.json"
    proc = run_child([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json", str(out)], cwd=ROOT,
                     timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
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


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed child that nobody reaped yet still has a /proc entry)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# A benchmark that starts `sleep` through run_child and writes the child's process id where the test can read it.
_PARENT = """
import subprocess, sys
sys.path.insert(0, {benchmarks!r})
from _report import run_child
run_child([sys.executable, "-c", "import os, time; open({pidfile!r}, 'w').write(str(os.getpid())); time.sleep(120)"],
          timeout={timeout})
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_benchmarks_child_dies_when_the_benchmark_is_killed(tmp_path):
    """The bug: a test's timeout SIGKILLed the methods_quality smoke and its training went on holding a core."""
    pidfile = tmp_path / "child.pid"
    script = _PARENT.format(benchmarks=str(ROOT / "benchmarks"), pidfile=str(pidfile), timeout=None)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child)
        parent.kill()  # SIGKILL: no handler or finally runs in the benchmark.
        parent.wait()
        assert _wait_gone(child), "the child outlived the benchmark that started it"
    finally:
        parent.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_benchmarks_child_is_killed_at_its_timeout(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = _PARENT.format(benchmarks=str(ROOT / "benchmarks"), pidfile=str(pidfile), timeout=5)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "TimeoutExpired" in proc.stderr
    assert _wait_gone(int(pidfile.read_text()))
