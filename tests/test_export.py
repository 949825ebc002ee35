"""Export to TorchScript and ONNX: dynamic batch, height and width, checked against PyTorch on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.config import load_config, to_yaml
from pipeline.engine.checkpoint import FORMAT, save_atomic
from pipeline.export import main
from pipeline.gan.networks import build_generator
from pipeline.infer.export import ExportError, check_export
from pipeline.infer.generators import PaddedGenerator, load_generators

# Two image sizes and two batch sizes, neither size a multiple of 4 in both sides.
SHAPES = [(1, 32, 32), (3, 37, 53)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint file in this project's format with two seeded tiny generators."""
    cfg = load_config(overrides=["model.generator=resnet_6blocks", "model.ngf=4", "data.crop_size=32",
                                 "data.load_size=36"])
    torch.manual_seed(1)
    nets = {name: build_generator("resnet_6blocks", ngf=4).state_dict() for name in ("G_ab", "G_ba")}
    path = tmp_path_factory.mktemp("export") / "ckpt-000000005.pt"
    save_atomic({"format": FORMAT, "config": to_yaml(cfg), "step": 5, "mlflow_run_id": "", "nets": nets}, path)
    return path


def pytorch_output(ckpt: Path, direction: str, x: torch.Tensor) -> np.ndarray:
    gens = load_generators(ckpt, direction)
    with torch.no_grad():
        return PaddedGenerator(gens.net, gens.multiple)(x).numpy()


def inputs(seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, h, w, generator=g) * 2 - 1 for n, h, w in SHAPES]


def test_torchscript_export_matches_pytorch(ckpt, tmp_path, capsys):
    out = tmp_path / "g_ab.pt"
    assert main(["--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(out), "--check",
                 "1x32x32", "3x37x53"]) == 0
    assert "matches PyTorch within" in capsys.readouterr().out

    extra = {"cyclegan.json": ""}
    model = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["cyclegan.json"])["pad_multiple"] == 4
    for x in inputs():
        with torch.no_grad():
            got = model(x).numpy()
        assert got.shape == x.shape
        np.testing.assert_allclose(got, pytorch_output(ckpt, "AtoB", x), atol=1e-4, rtol=0)


def test_onnx_export_runs_in_onnxruntime_and_matches_pytorch(ckpt, tmp_path, capsys):
    out = tmp_path / "g_ba.onnx"
    assert main(["--checkpoint", str(ckpt), "--direction", "BtoA", "--format", "onnx", "--output", str(out)]) == 0
    assert "matches PyTorch within" in capsys.readouterr().out

    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["direction"] == "BtoA" and meta["generator"] == "resnet_6blocks"
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # Symbolic N, H, W.

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x in inputs():
        got = session.run(["translated"], {"image": x.numpy()})[0]
        assert got.shape == x.shape
        np.testing.assert_allclose(got, pytorch_output(ckpt, "BtoA", x), atol=1e-4, rtol=0)


def test_check_fails_on_a_model_that_does_not_match(ckpt, tmp_path):
    gens = load_generators(ckpt, "AtoB")
    path = tmp_path / "g.pt"
    assert main(["--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(path), "--no-check"]) == 0
    other = PaddedGenerator(load_generators(ckpt, "BtoA").net, gens.multiple)  # G_ba is not what was exported.
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_export(other, path, "torchscript", [(1, 16, 16)])
