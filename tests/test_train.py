"""End-to-end runs of pipeline.train on real shards with a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from pipeline.config import load_config
from pipeline.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from pipeline.train.cli import held_out_summary, main
from pipeline.train.loop import NonFiniteLossError, run


def mlflow_run(tmp_path, run_id):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_run(run_id)


def test_short_run_writes_checkpoints_samples_and_mlflow_records(tiny, tmp_path):
    result = run(load_config([], tiny()))
    run_dir = tmp_path / "run"
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 6]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-000000000.png", "step-000000003.png",
                                                                     "step-000000006.png"]
    assert load_config([run_dir / "config.yaml"]).train.steps == 6
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(m["loss/G_ab/cycle"])) for m in lines)

    client, record = mlflow_run(tmp_path, result.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.params["model.ngf"] == "4" and record.data.params["train.steps"] == "6"
    history = client.get_metric_history(result.run_id, "loss/D_b")
    assert [m.step for m in history] == [2, 4, 6]
    for key in ("loss/G_ab/gan", "loss/G_ba/gan", "loss/G_ab/cycle", "loss/G_ba/cycle", "loss/G_ab/idt",
                "loss/D_a", "lr", "images_seen", "perf/images_per_s"):
        assert key in record.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in artifacts and "checkpoints" in artifacts
    images = {a.path for a in client.list_artifacts(result.run_id, "images")}
    # MLflow's log_image names files samples+step+<step>+...: one PNG and one compressed thumbnail per grid, at the
    # grid steps (0, 3, 6), and each PNG is the grid saved in the run directory.
    steps = sorted(int(path.split("+step+")[1].split("+")[0]) for path in images if path.endswith(".png"))
    assert steps == [0, 3, 6] and sum(path.endswith("+compressed.webp") for path in images) == 3
    from PIL import Image
    for path in sorted(p for p in images if p.endswith(".png")):
        step = int(path.split("+step+")[1].split("+")[0])
        logged = Image.open(client.download_artifacts(result.run_id, path, str(tmp_path / "dl")))
        saved = Image.open(run_dir / "samples" / f"step-{step:09d}.png")
        assert logged.size == saved.size and logged.tobytes() == saved.tobytes()

    state = load_checkpoint(run_dir / "ckpt-000000006")
    assert state["step"] == 6 and state["images_seen"] == 6 and state["mlflow_run_id"] == result.run_id
    assert len(state["ranks"][0]["pool_a"]["images"]) == 2


def test_resume_continues_bitwise_and_the_same_mlflow_run(tiny, tmp_path):
    straight = tiny(run_dir=str(tmp_path / "straight"), **{"train.steps": 8, "checkpoint.every_steps": 8})
    run(load_config([], straight))
    chunked = tiny(run_dir=str(tmp_path / "chunked"), **{"train.steps": 8, "checkpoint.every_steps": 8,
                                                          "control.stop_after_steps": 3})
    first = run(load_config([], chunked))
    assert first.stopped and first.step == 3
    second = run(load_config([], chunked))
    assert second.stopped and second.step == 6
    third = run(load_config([], chunked))
    assert not third.stopped and third.step == 8
    assert first.run_id == second.run_id == third.run_id

    a = load_checkpoint(tmp_path / "straight" / "ckpt-000000008")
    b = load_checkpoint(tmp_path / "chunked" / "ckpt-000000008")
    for name in a["nets"]:
        for key, value in a["nets"][name].items():
            assert torch.equal(value, b["nets"][name][key]), f"{name}.{key}"
    assert torch.equal(a["ranks"][0]["pool_b"]["images"], b["ranks"][0]["pool_b"]["images"])
    client, _ = mlflow_run(tmp_path, third.run_id)
    steps = [m.step for m in client.get_metric_history(third.run_id, "loss/G_ab/gan")]
    assert steps == [2, 4, 6, 8]  # log_every_steps 2, once each across the three processes
    lrs = {m.step: m.value for m in client.get_metric_history(third.run_id, "lr")}
    straight_lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for line in straight_lines:
        assert lrs[line["step"]] == pytest.approx(line["lr"], rel=0, abs=0)


def poison_from_step(monkeypatch, first_bad: int) -> None:
    """NaN in every loss from training step `first_bad` on (the A batch is NaN), counted in steps of the loop."""
    import pipeline.gan.step as step_module

    real_call = step_module.TrainStep.__call__
    steps = {"n": 0}

    def poisoned(self, real_a, real_b, stop_requested=False):
        steps["n"] += 1
        if steps["n"] >= first_bad:
            real_a = real_a * float("nan")
        return real_call(self, real_a, real_b, stop_requested)

    monkeypatch.setattr(step_module.TrainStep, "__call__", poisoned)


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny, tmp_path, monkeypatch):
    poison_from_step(monkeypatch, 5)
    cfg = load_config([], tiny(**{"train.steps": 20, "control.max_nonfinite_steps": 3, "checkpoint.every_steps": 2}))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a NaN/inf loss \\(last at step 7\\)"):
        run(cfg)
    saved = list_checkpoints(tmp_path / "run")
    assert [step for step, _ in saved] == [2, 4, 6]
    # Steps 5 and 6 were skipped: the checkpoint of step 6 holds exactly the weights and moments of step 4.
    at_4, at_6 = (load_checkpoint(saved[i][1]) for i in (1, 2))
    for name, net in at_6["nets"].items():
        for key, value in net.items():
            assert torch.isfinite(value).all() and torch.equal(value, at_4["nets"][name][key]), f"{name}.{key}"
    assert at_6["nonfinite_steps"] == 2 and at_4["nonfinite_steps"] == 0
    assert at_6["opt_g"]["state"][0]["step"] == at_4["opt_g"]["state"][0]["step"] == 4


def test_max_nonfinite_steps_0_turns_the_check_off_and_says_so(tiny, tmp_path, monkeypatch, caplog):
    poison_from_step(monkeypatch, 3)
    result = run(load_config([], tiny(**{"train.steps": 4, "control.max_nonfinite_steps": 0})))
    assert result.step == 4 and not result.stopped
    assert "control.max_nonfinite_steps=0: losses are not checked for NaN/inf" in caplog.text
    # Off means off: the NaN reached the weights (documented), nothing was counted as skipped.
    state = load_checkpoint(tmp_path / "run" / "ckpt-000000004")
    assert state["nonfinite_steps"] == 0
    assert not all(torch.isfinite(v).all() for v in state["nets"]["G_ab"].values())


def test_checkpoint_every_steps_0_saves_only_the_last_step(tiny, tmp_path):
    run(load_config([], tiny(**{"train.steps": 5, "checkpoint.every_steps": 0})))
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [5]


def test_train_threads_sets_the_intra_op_pool(tiny):
    before = torch.get_num_threads()
    try:
        run(load_config([], tiny(**{"train.steps": 1, "perf.threads": 3})))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("g, idt, words", [
    (0.2144, 0.4852, "(2.3x lower than identity)"),
    (0.3632, 0.1510, "(2.4x higher than identity: worse than not translating)"),
    (0.25, 0.25, "(equal to identity)"),
])
def test_end_of_training_line_is_worded_by_direction(g, idt, words):
    line = held_out_summary({"AtoB/l1": g, "AtoB/l1_identity": idt, "AtoB/pairs": 32.0})
    assert line == f"held-out A->B L1 error over 32 pairs: G_ab {g:.4f} vs identity {idt:.4f} {words}"
    with_ssim = held_out_summary({"AtoB/l1": g, "AtoB/l1_identity": idt, "AtoB/pairs": 32.0, "AtoB/ssim": 0.8,
                                  "AtoB/ssim_identity": 0.76}, "G")
    assert with_ssim.splitlines() == [line.replace("G_ab", "G"),
                                      "held-out A->B SSIM to the ground truth: G 0.8000 vs input 0.7600 (higher)"]


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train.stepz=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err


def test_cli_reports_missing_shards(tmp_path, capsys):
    code = main([f"data.train_a={tmp_path}/none/*.tar", f"data.train_b={tmp_path}/none/*.tar",
                 f"run_dir={tmp_path}/run", "tracking.enabled=false"])
    assert code == 2
    assert "matches no file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_architecture_is_refused_by_name(tiny, tmp_path):
    run(load_config([], tiny(**{"train.steps": 2, "checkpoint.every_steps": 2, "tracking.enabled": False})))
    cfg = load_config([], tiny(**{"train.steps": 4, "model.ngf": 8, "tracking.enabled": False}))
    with pytest.raises(CheckpointError, match=r"model.ngf: checkpoint 4, config 8"):
        run(cfg)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]  # nothing overwritten


def test_reference_weights_initialise_a_new_run(tiny, tmp_path):
    from pipeline.gan.networks import build_discriminator, build_generator
    from pipeline.infer.interop import export_reference

    torch.manual_seed(9)
    ref = {"G_ab": build_generator("resnet_6blocks", ngf=4), "G_ba": build_generator("resnet_6blocks", ngf=4),
           "D_a": build_discriminator("basic", ndf=4), "D_b": build_discriminator("basic", ndf=4)}
    export_reference(ref, tmp_path / "ref")
    cfg = load_config([], tiny(**{"train.steps": 1, "checkpoint.init_from": str(tmp_path / "ref"),
                                  "optim.lr": 0.0, "tracking.enabled": False}))
    run(cfg)
    state = load_checkpoint(tmp_path / "run" / "ckpt-000000001")
    for name, net in ref.items():
        assert all(torch.equal(state["nets"][name][k], v) for k, v in net.state_dict().items())


def test_data_bound_runs_are_told_how_many_workers_would_help(tiny, caplog):
    import logging

    from pipeline.engine.dist import DistInfo
    from pipeline.tracking.recorder import Recorder

    cfg = load_config([], tiny(**{"tracking.enabled": False, "data.workers": 2}))
    recorder = Recorder(cfg, DistInfo(), None)
    with caplog.at_level(logging.WARNING):
        recorder.log_metrics({"perf/data_wait_share": 0.1}, 1)
        assert "data-bound" not in caplog.text
        recorder.log_metrics({"perf/data_wait_share": 0.5}, 2)  # half the time waiting: twice the workers
    assert "data-bound: 50% of step time" in caplog.text and "data.workers=4 would feed" in caplog.text
    recorder.finish("FINISHED")


@pytest.mark.parametrize("model", [{"model.norm": "group", "model.norm_groups": 2, "model.padding": "replicate"},
                                   {"model.norm": "layer", "model.padding": "zero"}], ids=["group", "layer"])
def test_the_other_norms_and_paddings_train_resume_and_are_checked_on_resume(tiny, tmp_path, model):
    common = {"train.steps": 4, "checkpoint.every_steps": 2, "tracking.enabled": False, **model}
    first = run(load_config([], tiny(**common, **{"control.stop_after_steps": 2})))
    assert first.stopped and first.step == 2
    done = run(load_config([], tiny(**common)))
    assert done.step == 4 and all(torch.isfinite(torch.tensor(v)) for k, v in done.metrics.items()
                                  if k.startswith("loss/"))
    state = load_checkpoint(tmp_path / "run" / "ckpt-000000004")
    assert any(".conv_block." in k for k in state["nets"]["G_ab"])
    other = {**common, "model.padding": "reflect" if model["model.padding"] != "reflect" else "zero"}
    with pytest.raises(CheckpointError, match="model.padding"):
        run(load_config([], tiny(**{**other, "train.steps": 6})))


def eval_history(tmp_path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_checkpoint_follows_the_metric_through_pruning_and_resume(tiny, tmp_path, mode):
    from pipeline.engine.checkpoint import find_latest_loadable

    common = {"train.steps": 12, "checkpoint.every_steps": 2, "checkpoint.keep_last": 1, "eval.paired": True,
              "eval.every_steps": 2, "checkpoint.best_metric": "eval/AtoB/l1", "checkpoint.best_mode": mode,
              "report.sample_every_steps": 0}
    first = run(load_config([], tiny(**common, **{"control.stop_after_steps": 6})))
    assert first.stopped
    done = run(load_config([], tiny(**common)))
    assert done.step == 12 and done.run_id == first.run_id
    history = eval_history(tmp_path, done.run_id, "eval/AtoB/l1")
    assert sorted(history) == [2, 4, 6, 8, 10, 12]  # One series across the resume.
    pick = min if mode == "min" else max
    best_step = pick(history, key=lambda s: (history[s], s) if mode == "min" else (history[s], -s))
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["best"] == {"metric": "eval/AtoB/l1", "mode": mode, "value": pytest.approx(history[best_step]),
                            "step": best_step}
    # best.pt is a generators file: what translate and evaluate need, without D, optimisers or pools.
    assert best["step"] == best_step and best["kind"] == "generators" and set(best["nets"]) == {"G_ab", "G_ba"}
    # Pruning kept one step checkpoint and never best.pt; resuming takes the newest step checkpoint.
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [12]
    assert find_latest_loadable(tmp_path / "run")[0].name == "ckpt-000000012"
    logged = eval_history(tmp_path, done.run_id, "best/eval/AtoB/l1")
    assert logged[best_step] == pytest.approx(history[best_step])
    # Each logged best beats every evaluation before it.
    for step, value in logged.items():
        earlier = [history[s] for s in history if s < step]
        assert all((value < v) if mode == "min" else (value > v) for v in earlier), (step, logged, history)


def test_best_metric_needs_an_evaluation_and_a_known_key(tiny):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="needs an evaluation during training"):
        load_config([], tiny(**{"checkpoint.best_metric": "eval/AtoB/l1"}))
    with pytest.raises(ConfigError, match="names an evaluation metric"):
        load_config([], tiny(**{"checkpoint.best_metric": "AtoB/l1", "eval.paired": True, "eval.every_steps": 2}))
    cfg = load_config([], tiny(**{"checkpoint.best_metric": "eval/AtoB/fdi", "eval.paired": True,
                                  "eval.every_steps": 2, "tracking.enabled": False}))
    with pytest.raises(ConfigError, match=r"eval/AtoB/fdi is not among the evaluation's metrics: .*eval/AtoB/l1"):
        run(cfg)


@pytest.mark.parametrize("source", ["directory", "landed file", "generators file"])
def test_our_checkpoints_initialise_a_new_run(tiny, tmp_path, source):
    from support.runs import ROOT

    from pipeline.pack import main as pack

    if source == "landed file":
        path = ROOT / "tests" / "assets" / "landed-5635b11" / "ckpt-000000004.pt"
    else:
        run(load_config([], tiny(**{"train.steps": 2, "run_dir": str(tmp_path / "first"), "tracking.enabled": False,
                                    "report.sample_every_steps": 0})))
        path = tmp_path / "first" / "ckpt-000000002"
        if source == "generators file":
            assert pack([str(path), str(tmp_path / "g.pt")]) == 0
            path = tmp_path / "g.pt"
    start = load_checkpoint(path, ranks=None)
    run(load_config([], tiny(**{"train.steps": 1, "checkpoint.init_from": str(path), "optim.lr": 0.0,
                                "tracking.enabled": False, "report.sample_every_steps": 0})))
    state = load_checkpoint(tmp_path / "run" / "ckpt-000000001")
    assert state["step"] == 1  # A new run: counters start at 0.
    for name, weights in start["nets"].items():
        assert all(torch.equal(state["nets"][name][k], v) for k, v in weights.items()), name
    assert set(start["nets"]) == ({"G_ab", "G_ba"} if source == "generators file" else {"G_ab", "G_ba", "D_a", "D_b"})


def test_uploads_carry_the_generators_or_with_checkpoint_content_full_the_whole_checkpoint(tiny, tmp_path):
    args = {"train.steps": 2, "checkpoint.every_steps": 2, "report.sample_every_steps": 0}
    light = run(load_config([], tiny(**args)))
    full = run(load_config([], tiny(**args, **{"run_dir": str(tmp_path / "full"),
                                               "tracking.checkpoint_content": "full"})))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(light.run_id, "checkpoints")] == ["checkpoints/ckpt-000000002.pt"]
    packed = load_checkpoint(client.download_artifacts(light.run_id, "checkpoints/ckpt-000000002.pt",
                                                       str(tmp_path / "dl")))
    assert packed["kind"] == "generators" and set(packed["nets"]) == {"G_ab", "G_ba"} and "ranks" not in packed
    assert not (tmp_path / "run" / ".upload").exists()  # The file for the upload is not left behind.
    names = [a.path for a in client.list_artifacts(full.run_id, "checkpoints/ckpt-000000002")]
    assert sorted(names) == ["checkpoints/ckpt-000000002/.metadata", "checkpoints/ckpt-000000002/__0_0.distcp"]
    whole = load_checkpoint(client.download_artifacts(full.run_id, "checkpoints/ckpt-000000002",
                                                      str(tmp_path / "dl2")))
    assert whole["step"] == 2 and len(whole["ranks"]) == 1 and set(whole["nets"]) == {"G_ab", "G_ba", "D_a", "D_b"}


@pytest.mark.parametrize("scaling, lr", [("none", 2e-4), ("linear", 8e-4), ("sqrt", 4e-4)])
def test_the_global_batch_and_the_learning_rate_in_use_are_logged_and_optionally_scaled(tiny, tmp_path, caplog,
                                                                                        scaling, lr):
    cfg = load_config([], tiny(**{"data.batch_per_rank": 4, "optim.lr_scaling": scaling, "train.steps": 4,
                                  "tracking.enabled": False}))
    with caplog.at_level("INFO"):
        run(cfg)
    assert f"global batch 4 per domain and step (1 rank(s) x data.batch_per_rank=4); learning rate {lr:g}" \
        in caplog.text
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 2 and first["lr"] == pytest.approx(lr)  # Before the decay (the second half).
    assert ("optim.lr_scaling=sqrt or linear" in caplog.text) == (scaling == "none")
