"""The CUDA path, for real on a GPU (skipped without one; `make gpu-check` runs these first).

Each run is a subprocess of the production command on the tiny config (32 px crops, ngf = ndf = 4), so cudnn,
TF32 and deterministic settings, which are process-wide, never leak between tests. MLflow is off: these check
the device path, not tracking (tests/test_train.py does that).

The bands below were measured on CPU, where bf16 and fp16 autocast and the GradScaler run the same code (see
each constant); a GPU run that falls outside them computes something else.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.runs import ROOT, nets_equal, process_env, single_rank_cmd, tiny_overrides, train_cmd

from pipeline.engine.checkpoint import load_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CUDA = {"train.device": "cuda", "tracking.enabled": False, "report.sample_every_steps": 0,
        "checkpoint.resume": "never"}

# Reconstruction terms (cycle, identity) of bf16/fp16 against fp32, same seed, 200 steps logged every 20: on
# CPU the 100-step means differed by at most 2.9% and single 20-step means by at most 12% (the fp16 scaler's
# first skipped steps). Adversarial terms (G's GAN terms, D) are chaotic: 100-step means within 20.4% there;
# two fp32 runs of different seeds differ by up to 44%, so 30% still says "the same run".
RECONSTRUCTION_MEAN_BAND = 0.05
RECONSTRUCTION_POINT_BAND = 0.15
ADVERSARIAL_MEAN_BAND = 0.30
# fp16 starts at a loss scale of 2**16; the scaler halves it on each overflow: 7 skipped steps on CPU.
FP16_SKIPPED_MAX = 20
# Same weights, same batch: other kernels (NHWC, inductor's fused code) round differently, and Adam amplifies
# it (gradients of biases in front of InstanceNorm are pure rounding). Measured on CPU (fp32) at steps 1-5:
# at most 2e-6, 7e-5, 5e-4, 3.6e-3, 1.2e-2 relative.
EAGER_TOLERANCE = [1e-4, 1e-3, 5e-2, 5e-2, 5e-2]


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=process_env(4), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train(shards, run_dir: Path, **extra) -> list[dict]:
    """Train on CUDA; the logged metrics, one dict per log line."""
    run(train_cmd(0, tiny_overrides(shards, run_dir, **{**CUDA, **extra})), run_dir.parent)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def loss_keys(rows: list[dict]) -> list[str]:
    return sorted(k for k in rows[0] if k.startswith("loss/"))


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_200_steps_in_fp32_bf16_and_fp16_are_finite_and_low_precision_tracks_fp32(shards, tmp_path):
    # data.workers=2: batches come through pinned memory and non_blocking copies, as in a real run.
    common = {"train.steps": 200, "report.log_every_steps": 20, "checkpoint.every_steps": 0, "data.workers": 2}
    curves = {p: train(shards, tmp_path / p, **common, **{"train.precision": p}) for p in ("fp32", "bf16", "fp16")}
    ref = curves["fp32"]
    assert ref[-1]["perf/peak_gpu_mem_gb"] > 0
    for precision, rows in curves.items():
        assert len(rows) == 10 and all(math.isfinite(r[k]) for r in rows for k in loss_keys(rows)), precision
        assert rows[-1]["nonfinite_steps"] == 0, precision
        assert rows[-1]["loss/G_ab/cycle"] < 0.75 * rows[0]["loss/G_ab/cycle"], f"{precision} does not learn"
    assert curves["fp16"][-1]["fp16_skipped_steps"] <= FP16_SKIPPED_MAX
    for precision in ("bf16", "fp16"):
        rows = curves[precision]
        for key in loss_keys(ref):
            late = [np.mean([r[key] for r in rs[5:]]) for rs in (rows, ref)]
            if "cycle" in key or "idt" in key:
                assert relative(*late) <= RECONSTRUCTION_MEAN_BAND, (precision, key, late)
                worst = max(relative(r[key], f[key]) for r, f in zip(rows, ref))
                assert worst <= RECONSTRUCTION_POINT_BAND, (precision, key, worst)
            else:
                assert relative(*late) <= ADVERSARIAL_MEAN_BAND, (precision, key, late)


def test_resume_on_cuda_is_bitwise_in_fp32_with_perf_deterministic(shards, tmp_path):
    common = {"train.steps": 8, "checkpoint.every_steps": 8, "data.workers": 1, "perf.deterministic": True}
    train(shards, tmp_path / "straight", **common)
    chunked = tiny_overrides(shards, tmp_path / "chunked", **{**CUDA, **common, "control.stop_after_steps": 4,
                                                              "checkpoint.resume": "auto"})
    first = subprocess.run(train_cmd(0, chunked), env=process_env(4), cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 3 and "stopped after step 4" in first.stderr, first.stderr[-3000:]
    run(train_cmd(0, chunked), tmp_path)
    a = load_checkpoint(tmp_path / "straight" / "ckpt-000000008")
    b = load_checkpoint(tmp_path / "chunked" / "ckpt-000000008")
    assert nets_equal(a, b)
    for key in ("pool_a", "pool_b"):
        assert torch.equal(a["ranks"][0][key]["images"], b["ranks"][0][key]["images"])


@pytest.fixture
def cuda_checkpoint(shards, tmp_path) -> Path:
    train(shards, tmp_path / "trained", **{"train.steps": 4, "checkpoint.every_steps": 4})
    return tmp_path / "trained" / "ckpt-000000004"


def test_translate_on_cuda_matches_the_cpu_translation(cuda_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 32), (45, 61), (64, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inputs / f"{i}.png")
    outputs = {}
    for device in ("cuda", "cpu"):
        run([sys.executable, "-m", "pipeline.translate", "--checkpoint", str(cuda_checkpoint), "--input", str(inputs),
             "--output", str(tmp_path / device), "--device", device], ROOT)
        outputs[device] = {p.name: np.asarray(Image.open(p), dtype=np.int16)
                           for p in sorted((tmp_path / device / "images").glob("*.png"))}
    assert set(outputs["cuda"]) == {"0.png", "1.png", "2.png"}
    for name, cpu in outputs["cpu"].items():
        diff = np.abs(outputs["cuda"][name] - cpu)
        # TF32 convolutions on CUDA (torch's default): a few 8-bit levels where rounding straddles a step.
        assert diff.max() <= 3 and diff.mean() < 0.5, (name, diff.max(), diff.mean())


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_of_a_cuda_checkpoint_is_checked_on_cuda(cuda_checkpoint, tmp_path, fmt):
    out = tmp_path / f"G.{'pt' if fmt == 'torchscript' else 'onnx'}"
    proc = run([sys.executable, "-m", "pipeline.export", "--checkpoint", str(cuda_checkpoint), "--format", fmt,
                "--output", str(out), "--device", "cuda"], ROOT)
    assert out.exists() and "matches PyTorch within" in proc.stdout
    assert f"check {fmt} on cuda" in proc.stderr


@pytest.mark.parametrize("variant", [
    {"perf.channels_last": True},
    {"perf.compile": True},
    {"perf.compile": True, "perf.compile_mode": "reduce-overhead"},
], ids=["channels_last", "compile", "compile-cudagraphs"])
def test_channels_last_and_compile_give_the_eager_losses(shards, tmp_path, variant):
    # True fp32 (no TF32): the comparison is of kernels, not of TF32's 10-bit mantissa.
    common = {"train.steps": 5, "report.log_every_steps": 1, "checkpoint.every_steps": 0, "perf.tf32": False}
    eager = train(shards, tmp_path / "eager", **common)
    other = train(shards, tmp_path / "other", **common, **variant)
    for step, (a, b, tol) in enumerate(zip(other, eager, EAGER_TOLERANCE), start=1):
        worst = max(relative(a[k], b[k]) for k in loss_keys(eager))
        assert worst <= tol, (variant, step, worst)


def test_a_one_rank_nccl_group_through_torchrun_equals_a_plain_cuda_run_bitwise(shards, tmp_path):
    common = {"train.steps": 4, "checkpoint.every_steps": 4, "perf.deterministic": True}
    train(shards, tmp_path / "plain", **common)
    proc = run(single_rank_cmd(tiny_overrides(shards, tmp_path / "group", **{**CUDA, **common})), tmp_path)
    assert "rank 0/1 joined the nccl process group" in proc.stderr
    assert nets_equal(load_checkpoint(tmp_path / "plain" / "ckpt-000000004"),
                      load_checkpoint(tmp_path / "group" / "ckpt-000000004"))


def test_both_instance_norm_kernels_agree_on_cuda():
    from pipeline.gan.networks import GroupKernelInstanceNorm2d

    x = torch.randn(4, 64, 64, 64, device="cuda", requires_grad=True)
    reference = torch.nn.InstanceNorm2d(64)(x)
    grouped = GroupKernelInstanceNorm2d(64)(x)
    assert (grouped - reference).abs().max().item() < 1e-5
    g = torch.randn_like(reference)
    assert torch.allclose(torch.autograd.grad(grouped, x, g)[0], torch.autograd.grad(reference, x, g)[0],
                          atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiled_translation_on_cuda_equals_untiled_and_bounds_device_memory(precision):
    from pipeline.gan.networks import build_generator
    from pipeline.infer.generators import PaddedGenerator
    from pipeline.infer.translate import translate_tiled

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    net = build_generator("resnet_9blocks", ngf=32, init_gain=0.3).eval().to(cuda)
    x = torch.rand(3, 1000, 1300, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None):
        want = PaddedGenerator(net, 4)(x[None].to(cuda))[0].float().cpu()
    untiled_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    got = next(translate_tiled(net, 4, [("x", x)], cuda, 128, precision))[1]
    tiled_peak = torch.cuda.max_memory_allocated() - base
    print(f"{precision}: CUDA peak untiled {untiled_peak / 2**30:.2f} GB, tiled (128) {tiled_peak / 2**30:.2f} GB")
    assert tiled_peak < untiled_peak / 4
    if precision == "fp32":
        assert (got - want).abs().max() < 1e-4
    else:
        assert (got - want).abs().mean() < 0.02
