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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.engine.checkpoint import CheckpointError
from pipeline.infer.export import (
    DEFAULT_OPSET,
    FORMATS,
    ExportError,
    export,
)
from pipeline.infer.generators import load_generators
from pipeline.infer.translate import select_device
from pipeline.logs import one_line
from pipeline.translate import add_generator_args, model_overrides


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
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where the check runs PyTorch and TorchScript (the exported file is the same)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for chatty in ("onnxscript", "onnx_ir"):  # Graph optimisation steps, one line each.
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # "torchvision is not installed. Skipping torchvision::nms" and friends: irrelevant to generators.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        gens = load_generators(args.checkpoint, args.direction, model_overrides(args), args.weights)
        s = gens.cfg.data.crop_size
        shapes = [] if args.no_check else args.check or [(1, s, s), (2, s + 3, max(s - 5, 1))]
        worst = export(gens, args.format, args.output, shapes, args.tolerance, args.opset,
                       select_device(args.device))
    except (CheckpointError, ConfigError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    channels = gens.formats()[0].channels
    sizes = ", ".join(f"{n}x{channels}x{h}x{w}" for n, h, w in shapes)
    checked = "" if worst is None else f"; matches PyTorch within {worst:.1e} on {sizes}"
    print(f"wrote {args.format} {args.output} ({gens.direction}, {gens.model.generator}){checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
