"""The generators' moving average: the maths, resume, and which weights inference uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.engine.checkpoint import CheckpointError, load_checkpoint
from pipeline.infer.generators import load_generators
from pipeline.train.loop import run

EMA = {"train.ema_decay": 0.5, "train.ema_start_step": 1, "tracking.enabled": False,
       "report.sample_every_steps": 0}


def test_ema_equals_the_average_computed_by_hand_over_3_steps(tiny, tmp_path):
    run(load_config([], tiny(**EMA, **{"train.steps": 3, "checkpoint.every_steps": 1, "checkpoint.keep_last": 3})))
    ckpts = [load_checkpoint(tmp_path / "run" / f"ckpt-00000000{s}") for s in (1, 2, 3)]
    for name in ("G_ab", "G_ba"):
        raw = [c["nets"][name] for c in ckpts]
        ema = [c["ema"]["nets"][name] for c in ckpts]
        for key in raw[0]:
            w1, w2, w3 = (r[key].double() for r in raw)
            expected = [w1, 0.5 * w1 + 0.5 * w2, 0.5 * (0.5 * w1 + 0.5 * w2) + 0.5 * w3]
            for got, want in zip((e[key] for e in ema), expected):
                torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
        assert not torch.equal(ema[2][next(iter(raw[0]))], raw[2][next(iter(raw[0]))])
    assert all(c["ema"]["started"] for c in ckpts)


def test_ema_starts_at_its_step_and_resume_continues_it_bitwise(tiny, tmp_path):
    common = {**EMA, "train.ema_start_step": 3, "train.ema_decay": 0.9, "train.steps": 8, "checkpoint.every_steps": 4}
    straight = load_config([], tiny(**common, run_dir=str(tmp_path / "straight")))
    run(straight)
    chunked = tiny(**common, run_dir=str(tmp_path / "chunked"))
    assert run(load_config([], [*chunked, "control.stop_after_steps=4"])).stopped
    run(load_config([], chunked))
    a, b = (load_checkpoint(tmp_path / d / "ckpt-000000008") for d in ("straight", "chunked"))
    for name in ("G_ab", "G_ba"):
        assert all(torch.equal(v, b["ema"]["nets"][name][k]) for k, v in a["ema"]["nets"][name].items())
    early = load_checkpoint(tmp_path / "straight" / "ckpt-000000004")
    assert early["ema"]["started"]  # Started at step 3.


@pytest.fixture
def trained(tiny, tmp_path):
    run(load_config([], tiny(**EMA, **{"train.steps": 3, "checkpoint.every_steps": 3})))
    return tmp_path / "run" / "ckpt-000000003"


def test_inference_takes_the_average_by_default_and_raw_weights_on_request(trained, tiny, tmp_path):
    state = load_checkpoint(trained)
    chosen = load_generators(trained)
    assert chosen.weights == "ema"
    assert all(torch.equal(v, state["ema"]["nets"]["G_ab"][k]) for k, v in chosen.net.state_dict().items())
    raw = load_generators(trained, "BtoA", weights="raw")
    assert raw.weights == "raw"
    assert all(torch.equal(v, state["nets"]["G_ba"][k]) for k, v in raw.net.state_dict().items())
    # Without an average, auto is raw and ema is refused with what to use.
    run(load_config([], tiny(**{"train.steps": 1, "checkpoint.every_steps": 1, "tracking.enabled": False,
                                "report.sample_every_steps": 0, "run_dir": str(tmp_path / "plain")})))
    plain = tmp_path / "plain" / "ckpt-000000001"
    assert load_generators(plain).weights == "raw"
    with pytest.raises(CheckpointError, match="has no generator EMA.*--weights raw"):
        load_generators(plain, weights="ema")


def test_translate_evaluate_and_export_commands_choose_the_weights(trained, shards, tmp_path):
    from pipeline.evaluate import main as evaluate_main
    from pipeline.export import main as export_main
    from pipeline.translate import main as translate_main

    img = tmp_path / "in" / "x.png"
    img.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    outs = {}
    for weights in ("auto", "raw"):
        args = ["--checkpoint", str(trained), "--input", str(img), "--output", str(tmp_path / weights),
                "--device", "cpu", "--weights", weights]
        assert translate_main(args) == 0
        outs[weights] = np.asarray(Image.open(tmp_path / weights / "images" / "x.png"))
    assert not np.array_equal(outs["auto"], outs["raw"])  # Different weights, different translations.
    assert evaluate_main(["--checkpoint", str(trained), "--test-a", shards["testA"], "--test-b", shards["testB"],
                          "--device", "cpu", "--weights", "raw", "--json", str(tmp_path / "ev.json")]) == 0
    assert export_main(["--checkpoint", str(trained), "--format", "torchscript", "--output",
                        str(tmp_path / "g.pt"), "--weights", "ema"]) == 0
    extra = {"cyclegan.json": ""}
    torch.jit.load(str(tmp_path / "g.pt"), _extra_files=extra)
    meta = extra["cyclegan.json"]
    assert '"weights": "ema"' in (meta.decode() if isinstance(meta, bytes) else meta)
