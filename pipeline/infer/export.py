"""Export of a padded generator to TorchScript or ONNX, checked against PyTorch after writing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.infer.generators import Generators, PaddedGenerator

log = logging.getLogger("pipeline.export")

FORMATS = ("torchscript", "onnx")
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """An export that failed or does not reproduce PyTorch's output."""


def metadata(gens: Generators) -> dict[str, Any]:
    """What an exported file records: the architecture, and how its inputs and outputs relate to stored pixel
    values (channels, depth, the window of stored values that maps to [-1, 1]), so a deployment can map them."""
    source, target = gens.formats()
    return {
        "direction": gens.direction,
        "generator": gens.model.generator,
        "ngf": gens.model.ngf,
        "norm": gens.model.norm,
        "pad_multiple": gens.multiple,
        "input": f"image: float32 (N, {source.channels}, H, W) in [-1, 1]; any N, H, W",
        "output": f"translated: float32 (N, {target.channels}, H, W) in [-1, 1]",
        "input_format": json.dumps(_described(source)),
        "output_format": json.dumps(_described(target)),
        "source": gens.source,
        "step": gens.step,
        "weights": gens.weights,
    }


def _described(fmt: Any) -> dict[str, Any]:
    """A domain's pixel format with its mapping spelled out: stored = (x + 1) / 2 * (high - low) + low."""
    described = {**fmt.to_dict(), "window": None if fmt.per_image else list(fmt.window())}
    described["mapping"] = ("per image: the input's own percentile window" if fmt.per_image
                            else "stored = (x + 1) / 2 * (window[1] - window[0]) + window[0], clipped")
    return described


def export_torchscript(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Script (not trace) the model, so no shape is baked in; metadata goes in the `cyclegan.json` extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is in maintenance, and says so.
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path), _extra_files={"cyclegan.json": json.dumps(meta)})


def export_onnx(model: nn.Module, path: Path, meta: dict[str, Any], opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] = (64, 64), channels: int = 3) -> None:
    """torch.onnx's exporter (torch.export based) with symbolic batch, height and width."""
    import onnx

    example = torch.zeros(2, channels, *example_size)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"],
                                    output_names=["translated"], dynamic_shapes={"x": dims}, opset_version=opset,
                                    verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """The exported model's output for `x`: TorchScript on x's device, ONNX Runtime on the CPU."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location=x.device)(x).cpu().numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["translated"], {"image": x.cpu().numpy()})[0]


@contextlib.contextmanager
def _true_fp32() -> Iterator[None]:
    """fp32 convolutions without TF32 (CUDA's default for them): a check compares full-precision maths."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def check_export(model: nn.Module, path: Path, fmt: str, shapes: Sequence[tuple[int, int, int]],
                 tolerance: float = 1e-4, seed: int = 0, device: torch.device | str = "cpu",
                 channels: int = 3) -> float:
    """Largest |exported - PyTorch| over random [-1, 1] batches of `shapes` (N, H, W) of `channels` channels,
    PyTorch (and TorchScript) running on `device`; raises ExportError above `tolerance`."""
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model).to(device)
    worst = 0.0
    for n, h, w in shapes:
        x = (torch.rand(n, channels, h, w, generator=generator) * 2 - 1).to(device)
        with torch.no_grad(), _true_fp32():
            expected = model(x).cpu().numpy()
            got = run_exported(path, fmt, x)
        if got.shape != expected.shape:
            raise ExportError(f"{fmt} output for input {tuple(x.shape)} has shape {got.shape}, not {expected.shape}")
        diff = float(np.abs(got - expected).max())
        log.info("check %s on %s: input %s, max |exported - PyTorch| = %.2e", fmt, torch.device(device).type,
                 tuple(x.shape), diff)
        worst = max(worst, diff)
        if not diff <= tolerance:
            raise ExportError(f"{fmt} export differs from PyTorch by {diff:.3g} (> {tolerance}) on {tuple(x.shape)}")
    return worst


def export(gens: Generators, fmt: str, path: Path, check_shapes: Sequence[tuple[int, int, int]] = (),
           tolerance: float = 1e-4, opset: int = DEFAULT_OPSET, device: torch.device | str = "cpu") -> float | None:
    """Export the generator of `gens` (with padding) to `path`; check it on `device` if `check_shapes` are given.

    Returns the largest difference found by the check (None without one).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    model = PaddedGenerator(gens.net.cpu().float(), gens.multiple).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(gens)
    channels = gens.formats()[0].channels
    if fmt == "torchscript":
        export_torchscript(model, path, meta)
    else:
        export_onnx(model, path, meta, opset, channels=channels)
    return (check_export(model, path, fmt, check_shapes, tolerance, device=device, channels=channels)
            if check_shapes else None)
