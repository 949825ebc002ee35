"""Training health: a run that is not learning says so once, with the evidence; a learning one stays silent."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from support.runs import process_env, tiny_overrides, train_cmd

from pipeline.train.health import TrainingHealth, input_dependence


def logs(cycle: list[float], d: float = 0.24) -> list[dict[str, float]]:
    return [{"loss/G_ab/cycle": c, "loss/G_ba/cycle": c, "loss/D_a": d, "loss/D_b": d} for c in cycle]


def observe(health: TrainingHealth, series: list[dict[str, float]], every: int = 100):
    said, signals = [], {}
    for i, metrics in enumerate(series, start=1):
        signals, warnings = health.observe(i * every, metrics)
        said += warnings
    return said, signals


def test_a_cycle_loss_that_does_not_fall_is_said_once_with_the_evidence():
    said, signals = observe(TrainingHealth(after_steps=500), logs([0.55, 0.56, 0.54, 0.55, 0.55, 0.56, 0.54, 0.55]))
    assert len(said) == 1 and "training health at step 500: the cycle loss has not fallen in 500 steps" in said[0]
    assert "the discriminators are at chance (0.24 against 0.25)" in said[0]
    assert "model.g_variant=colour" in said[0]  # The usual causes, the colour-blind networks first.
    assert 0.95 < signals["health/cycle_progress"] < 1.05 and signals["health/d_vs_chance"] == pytest.approx(0.96)


def test_a_falling_cycle_loss_is_silent_and_no_warning_comes_before_its_step():
    said, signals = observe(TrainingHealth(after_steps=500), logs([0.55, 0.4, 0.3, 0.25, 0.2, 0.18, 0.17, 0.16]))
    assert said == [] and signals["health/cycle_progress"] < 0.5
    early, _ = observe(TrainingHealth(after_steps=5000), logs([0.55] * 8))
    assert early == []
    off, signals = observe(TrainingHealth(after_steps=0), logs([0.55] * 8))
    assert off == [] and "health/cycle_progress" in signals  # Off: no warning, the metric still logged.


def test_discriminators_that_win_outright_and_translations_that_ignore_their_input_are_said():
    health = TrainingHealth(after_steps=100, gan_mode="lsgan")
    said, _ = observe(health, logs([0.5, 0.3, 0.2, 0.15, 0.1, 0.1], d=0.01)[:-1])
    health.dependence = 0.01  # A sample grid's translations, all alike.
    said += health.observe(600, logs([0.1], d=0.01)[0])[1]
    assert any("the discriminators win outright" in s for s in said)
    assert any("no longer depend on the input" in s for s in said) and len(said) == 2


def test_input_dependence_is_one_for_the_identity_and_zero_for_a_constant():
    x = torch.rand(4, 3, 8, 8)
    assert input_dependence(x, x) == pytest.approx(1.0)
    assert input_dependence(x, torch.zeros_like(x)) == 0.0


def test_the_demo_run_is_healthy(demo_metrics):
    """The demo's own logged losses (tests/assets/demo_metrics.jsonl, `make demo` at this version)."""
    said, signals = observe(TrainingHealth(after_steps=100), demo_metrics)
    assert said == [] and signals["health/cycle_progress"] < 0.9


@pytest.fixture
def demo_metrics():
    from support.runs import ROOT

    lines = (ROOT / "tests" / "assets" / "demo_metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss/")} for line in lines]


@pytest.mark.slow
def test_a_run_made_to_fail_warns_and_records_the_signals(shards, tmp_path):
    """A learning rate of 0: nothing learns, the cycle loss stays where it started."""
    overrides = tiny_overrides(shards, tmp_path / "run", **{
        "optim.lr": 0.0, "train.steps": 12, "report.log_every_steps": 1, "report.health_after_steps": 9,
        "report.sample_every_steps": 4, "checkpoint.every_steps": 0, "tracking.enabled": False})
    run = subprocess.run(train_cmd(0, overrides), env=process_env(), cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    warned = [line for line in run.stderr.splitlines() if "training health" in line]
    assert len(warned) == 1 and "the cycle loss has not fallen in 9 steps" in warned[0], run.stderr[-3000:]
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("health/cycle_progress" in x for x in logged)
    assert any("health/input_dependence" in x for x in logged)
