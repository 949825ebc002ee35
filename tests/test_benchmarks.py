"""CI smoke of every benchmark: each runs on a tiny case and writes its JSON (no timing is asserted)."""

import json
import subprocess
import sys

import pytest
from support.runs import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,keys", [
    ("bench_step.py", {"case", "impl", "seconds", "flops", "speedup"}),
    ("bench_data.py", {"format", "workers", "images_per_s", "per_worker"}),
    ("bench_ddp.py", {"world_size", "seconds_per_step", "images_per_s", "peak_rss_gb_per_rank"}),
    ("bench_shards.py", {"stage", "variant", "workers", "rate", "unit", "speedup"}),
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
