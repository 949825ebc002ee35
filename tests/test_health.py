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
    # Cycle losses of 5.5 at lambda 10: an L1 error of 0.55 per direction, what unrelated images give.
    said, signals = observe(TrainingHealth(after_steps=500), logs([5.5, 5.6, 5.4, 5.5, 5.5, 5.6, 5.4, 5.5]))
    assert len(said) == 1 and "training health at step 500: the cycle loss has not fallen in 500 steps" in said[0]
    assert "a reconstruction error of 0.55" in said[0]
    assert "the discriminators are at chance (0.24 against 0.25)" in said[0]
    assert "model.g_variant=colour" in said[0]  # The usual causes, the colour-blind networks first.
    assert 0.95 < signals["health/cycle_progress"] < 1.05 and signals["health/d_vs_chance"] == pytest.approx(0.96)


def test_a_falling_cycle_loss_is_silent_and_no_warning_comes_before_its_step():
    said, signals = observe(TrainingHealth(after_steps=500), logs([5.5, 4.0, 3.0, 2.5, 2.0, 1.8, 1.7, 1.6]))
    assert said == [] and signals["health/cycle_progress"] < 0.5
    early, _ = observe(TrainingHealth(after_steps=5000), logs([5.5] * 8))
    assert early == []
    off, signals = observe(TrainingHealth(after_steps=0), logs([5.5] * 8))
    assert off == [] and "health/cycle_progress" in signals  # Off: no warning, the metric still logged.


def test_a_generator_that_starts_as_the_identity_is_not_taken_for_one_that_does_not_learn():
    """The colour generator's cycle error starts near zero and grows a little as it learns the mapping."""
    said, signals = observe(TrainingHealth(after_steps=100), logs([0.23, 0.3, 0.4, 0.45, 0.5, 0.54, 0.5, 0.54]))
    assert said == [] and signals["health/cycle_progress"] > 1 and signals["health/cycle_l1"] < 0.1


def test_discriminators_that_win_outright_and_translations_that_ignore_their_input_are_said():
    health = TrainingHealth(after_steps=100, gan_mode="lsgan")
    said, _ = observe(health, logs([0.5, 0.3, 0.2, 0.15, 0.1, 0.1], d=0.01)[:-1])
    health.dependence = 0.01  # A sample grid's translations, all alike.
    said += health.observe(600, logs([0.1], d=0.01)[0])[1]
    assert any("the discriminators win outright" in s for s in said)
    assert any("no longer depend on the input" in s for s in said) and len(said) == 2


def test_cut_runs_are_watched_through_their_patchnce_loss():
    """No cycle in CUT: a PatchNCE loss that stays near chance (log 257 per term at lambda 10) is the sign."""
    def nce(values):
        return [{"loss/G/nce": v, "loss/G/gan": 0.3, "loss/D": 0.24} for v in values]

    flat = TrainingHealth(after_steps=300, nce_weight=10.0, nce_chance=5.55)
    said, signals = observe(flat, nce([54.0, 55.0, 54.5, 55.2, 54.8, 55.0]))
    assert len(said) == 1 and "the PatchNCE loss has not fallen in 300 steps" in said[0]
    assert "model.g_variant=colour" in said[0] and 0.95 < signals["health/nce_vs_chance"] < 1.0
    falling, _ = observe(TrainingHealth(after_steps=300, nce_weight=10.0), nce([54.0, 40.0, 30.0, 22.0, 18.0, 15.0]))
    assert falling == []
    # A generator that starts as the identity keeps the content from the start: low and flat is healthy.
    low, _ = observe(TrainingHealth(after_steps=300, nce_weight=10.0), nce([8.0, 8.5, 8.2, 8.4, 8.3, 8.6]))
    assert low == []
    restored = TrainingHealth(after_steps=300)
    restored.load_state_dict(flat.state_dict())
    assert restored.nce == flat.nce and restored.warned == {"nce"}


def test_input_dependence_is_one_for_the_identity_and_zero_for_a_constant():
    x = torch.rand(4, 3, 8, 8)
    assert input_dependence(x, x) == pytest.approx(1.0)
    assert input_dependence(x, torch.zeros_like(x)) == 0.0


@pytest.mark.parametrize("asset", ["demo_metrics.jsonl", "demo_colour_metrics.jsonl"])
def test_the_demo_run_is_healthy(asset):
    """The demo's own logged losses (`make demo` at this version: tests/assets/demo_metrics.jsonl), and the same
    with configs/colour.yaml, whose generators start as the colour transfer between the domains
    (tests/assets/demo_colour_metrics.jsonl): a cycle error near zero from the start, D near chance."""
    from support.runs import ROOT

    lines = (ROOT / "tests" / "assets" / asset).read_text().splitlines()
    said, _ = observe(TrainingHealth(after_steps=100), [
        {k: v for k, v in json.loads(line).items() if k.startswith("loss/")} for line in lines])
    assert said == []


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
