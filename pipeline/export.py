"""Export a generator for inference outside this code: `python -m pipeline.export --checkpoint C --format onnx
--output F`.

The exported model is `PaddedGenerator`: images (N, 3, H, W) float32 in [-1, 1] -> translations of the same
shape, with batch, height and width dynamic. It reflect-pads to the multiple the generator needs and crops back
inside, so any size works, exactly as `pipeline.translate` does. TorchScript files load with
`torch.jit.load(F)` (metadata in the `cyclegan.json` extra file); ONNX files run in ONNX Runtime (input
`image`, output `translated`, metadata in the model's metadata_props). After writing, the exported model is
run on random images at two sizes and batch sizes and compared with PyTorch; the export fails if any output
differs by more than `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.translate import Generators, PaddedGenerator, add_generator_args, load_generators, model_overrides

log = logging.getLogger("pipeline.export")

FORMATS = ("torchscript", "onnx")
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """An export that failed or does not reproduce PyTorch's output."""


def metadata(gens: Generators) -> dict[str, Any]:
    return {
        "direction": gens.direction,
        "generator": gens.model.generator,
        "ngf": gens.model.ngf,
        "norm": gens.model.norm,
        "pad_multiple": gens.multiple,
        "input": "image: float32 (N, 3, H, W) RGB in [-1, 1]; any N, H, W",
        "output": "translated: float32 (N, 3, H, W) in [-1, 1]",
        "source": gens.source,
        "step": gens.step,
    }


def export_torchscript(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Script (not trace) the model, so no shape is baked in; metadata goes in the `cyclegan.json` extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is in maintenance, and says so.
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path), _extra_files={"cyclegan.json": json.dumps(meta)})


def export_onnx(model: nn.Module, path: Path, meta: dict[str, Any], opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] = (64, 64)) -> None:
    """torch.onnx's exporter (torch.export based) with symbolic batch, height and width."""
    import onnx

    example = torch.zeros(2, 3, *example_size)
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
    """The exported model's output for `x`, run by TorchScript or ONNX Runtime on the CPU."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(x).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["translated"], {"image": x.numpy()})[0]


def check_export(model: nn.Module, path: Path, fmt: str, shapes: Sequence[tuple[int, int, int]],
                 tolerance: float = 1e-4, seed: int = 0) -> float:
    """Largest |exported - PyTorch| over random [-1, 1] batches of `shapes` (N, H, W); raises ExportError above
    `tolerance`."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n, h, w in shapes:
        x = torch.rand(n, 3, h, w, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(x).numpy()
        got = run_exported(path, fmt, x)
        if got.shape != expected.shape:
            raise ExportError(f"{fmt} output for input {tuple(x.shape)} has shape {got.shape}, not {expected.shape}")
        diff = float(np.abs(got - expected).max())
        log.info("check %s: input %s, max |exported - PyTorch| = %.2e", fmt, tuple(x.shape), diff)
        worst = max(worst, diff)
        if not diff <= tolerance:
            raise ExportError(f"{fmt} export differs from PyTorch by {diff:.3g} (> {tolerance}) on {tuple(x.shape)}")
    return worst


def export(gens: Generators, fmt: str, path: Path, check_shapes: Sequence[tuple[int, int, int]] = (),
           tolerance: float = 1e-4, opset: int = DEFAULT_OPSET) -> float | None:
    """Export the generator of `gens` (with padding) to `path`; check it if `check_shapes` are given.

    Returns the largest difference found by the check (None without one).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    model = PaddedGenerator(gens.net.cpu().float(), gens.multiple).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(gens)
    if fmt == "torchscript":
        export_torchscript(model, path, meta)
    else:
        export_onnx(model, path, meta, opset)
    return check_export(model, path, fmt, check_shapes, tolerance) if check_shapes else None


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not NxHxW, e.g. 2x64x64") from None
    return n, h, w


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(parser)
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--output", type=Path, required=True, help="file to write (.pt / .onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--check", type=_shape, nargs="*", default=None, metavar="NxHxW",
                        help="batches to compare with PyTorch (default: 1xSxS and 2x(S+3)x(S-5), S the crop size)")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |exported - PyTorch|")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for chatty in ("onnxscript", "onnx_ir"):  # Graph optimisation steps, one line each.
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # "torchvision is not installed. Skipping torchvision::nms" and friends: irrelevant to generators.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        gens = load_generators(args.checkpoint, args.direction, model_overrides(args))
        s = gens.cfg.data.crop_size
        shapes = [] if args.no_check else args.check or [(1, s, s), (2, s + 3, max(s - 5, 1))]
        worst = export(gens, args.format, args.output, shapes, args.tolerance, args.opset)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{n}x3x{h}x{w}" for n, h, w in shapes)
    checked = "" if worst is None else f"; matches PyTorch within {worst:.1e} on {sizes}"
    print(f"wrote {args.format} {args.output} ({gens.direction}, {gens.model.generator}){checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
