"""Batch translation with a trained generator: `python -m pipeline.translate --checkpoint C --input IN --output OUT`.

Reads a folder of images (subfolders allowed), a single image or WebDataset shards (`pipeline.shards` output),
translates every image at its own size and writes OUT/images/<the input's relative file name>, plus a results
page like the reference implementation's (`OUT/index.html`, input | output per row) and a contact sheet
(`OUT/contact_sheet.png`). `OUT/translations.json` lists what was written.

Any image size works: each image is reflect-padded to the multiple of 2**downsamplings the generator needs (4 for
resnet_*, 2**num_downs for unet_*), translated and cropped back. Images whose padded sizes agree are batched
together. Images too large for the device's memory take `--tile SIZE`: the generator runs layer by layer, each
layer in SIZE x SIZE tiles with the halo its kernel needs and norm statistics over the whole image, so the output
is the untiled one's (no seams, no colour shifts) with memory bounded by the tile size.

The checkpoint is one of ours (a `ckpt-*` directory, a `ckpt-*.pt` file of an earlier version, or a generators file
from `pipeline.pack`: G_ab for AtoB, G_ba for BtoA, architecture from the saved config)
or a reference-implementation weight file (`latest_net_G_A.pth` is A->B, `..._G_B.pth` B->A; its architecture
is read off its keys, or given with `--model.*` options) or a reference folder holding both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.stream import DataError
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.progress import Progress
from pipeline.infer.generators import (
    DIRECTIONS,
    MODEL_OPTIONS,
    PRECISIONS,
    WEIGHTS,
    load_generators,
    log,
)
from pipeline.infer.translate import (
    select_device,
    translate_source,
)
from pipeline.logs import one_line


def add_generator_args(parser: argparse.ArgumentParser, directions: Sequence[str] = DIRECTIONS,
                       default: str = "AtoB") -> None:
    """--checkpoint, --direction and the --model.* options of reference files (shared with evaluate, export)."""
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="our checkpoint (a ckpt-* directory, a ckpt-*.pt file, a generators file from "
                             "pipeline.pack), a reference *_net_G_A.pth / *_net_G_B.pth file, or a reference folder")
    parser.add_argument("--direction", choices=directions, default=default,
                        help="AtoB uses G_ab (reference G_A), BtoA G_ba (reference G_B)")
    parser.add_argument("--weights", choices=WEIGHTS, default="auto",
                        help="ema: the generators' moving average (train.ema_decay); raw: the trained weights; "
                             "auto (default): ema when the checkpoint has it")
    for option in MODEL_OPTIONS:
        parser.add_argument(f"--model.{option}", dest=f"model_{option}", default=None,
                            help=f"for reference files: model.{option} they were trained with")


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.{o}={getattr(args, f'model_{o}')}" for o in MODEL_OPTIONS if getattr(args, f"model_{o}")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.translate", description=__doc__.splitlines()[0])
    add_generator_args(parser)
    parser.add_argument("--input", required=True, help="image folder, image file, or shard pattern")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--size", type=int, default=0,
                        help="resize inputs to SIZE x SIZE first (the reference's test transform); 0 keeps sizes")
    parser.add_argument("--ext", choices=("keep", "png", "jpg", "webp", "tif", "npy"), default="keep",
                        help="output format: keep each input's file name and format (default), or convert; a "
                             "translation into a domain other than 8-bit RGB is written as tif where the format "
                             "asked for cannot hold its values losslessly")
    parser.add_argument("--tile", type=int, default=0, metavar="SIZE",
                        help="translate each image layer by layer in SIZE x SIZE tiles: memory bounded by SIZE "
                             "for images of any size, the same output as untiled (whole-image norm statistics, "
                             "no seams); 0 (default) translates whole images in batches")
    parser.add_argument("--page-rows", type=int, default=100, help="images shown on index.html")
    parser.add_argument("--sheet-rows", type=int, default=16, help="images in contact_sheet.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.tile < 0:
        parser.error("--tile must be a positive number of pixels (or 0: untiled)")
    tiles = Progress(None, unit="tiles", enabled=args.tile > 0)
    tiles.label = "tiles"
    try:
        device = select_device(args.device)
        gens = load_generators(args.checkpoint, args.direction, model_overrides(args), args.weights)
        log.info("translating %s with %s (%s, %s) on %s", args.input, args.checkpoint, args.direction,
                 gens.model.generator, device)
        manifest = translate_source(
            gens, args.input, args.output, device, args.batch_size, args.precision, args.size, args.ext,
            args.page_rows, args.sheet_rows,
            progress=lambda n: n % 500 == 0 and log.info("%d images translated", n), tile=args.tile,
            tile_progress=tiles,
        )
        tiles.close()
    except (CheckpointError, ConfigError, DataError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    skipped = f", {len(manifest['skipped'])} unreadable skipped" if manifest["skipped"] else ""
    print(f"{manifest['count']} images translated {args.direction} into {args.output / 'images'}{skipped}; "
          f"results page {args.output / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
