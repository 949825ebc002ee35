"""Image folders in the reference layout -> WebDataset tar shards per split, plus a manifest.

`python -m pipeline.shards SRC OUT [--maxcount N] [--maxsize BYTES] [--splits trainA,trainB,testA,testB]
[--workers N] [--resize SIDE] [--format jpeg|png|webp] [--quality Q] [--shuffle-seed S | --no-shuffle]
[--overwrite] [--no-progress]` reads SRC/trainA, trainB, testA, testB (JPEG/PNG/WebP, subfolders allowed)
and writes OUT/<split>/<split>-000000.tar ... and OUT/manifest.json (counts, sizes, sha256 per shard, the
encoding and shard-size options, skipped files). `python -m pipeline.shards inspect PATTERN` checks shards
(pipeline.shard_inspect).

Every image is fully decoded once to prove it readable; unreadable files are skipped and listed, never fatal.
By default the original bytes are stored unchanged; `--resize SIDE` resizes to SIDE x SIDE (bicubic, as the
training transform's resize to data.load_size, which then becomes a no-op) and `--format` re-encodes, so training
decodes less. The file's relative name is kept in `<key>.name.txt`. `--workers N` reads, verifies and encodes in
N processes while this process writes the tars in input order, so the output is byte-identical whatever N is.
Each split is written in a seeded random order (`--shuffle-seed S`, default 0, recorded in the manifest): every
shard then holds a random subset, and training's shard-order shuffle plus its shuffle buffer come close to a
full shuffle (with sorted files, similar neighbours share a shard). `--no-shuffle` keeps sorted order.
Tars are byte-identical on every run (fixed order, mtime, owner,
mode). Each shard is written under a temporary name and renamed when complete, and the manifest is written last,
so a half-written output never looks complete.

OUT may be `pipe:COMMAND`, where COMMAND contains `{path}` (the shard's or manifest.json's path relative to the
output, shell-quoted): each shard's bytes go to the command's standard input, e.g.
`pipe:aws s3 cp - s3://bucket/horse2zebra/{path}`. The sha256 is computed while streaming; a command that fails,
or exits while its input is still being written (a broken pipe, even with exit code 0), is an error naming the
shard; manifest.json goes last. A run that
stops partway kills every process of the open shard's command before its input ends, so no command sees a
truncated shard end normally.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.shards import (
    DEFAULT_MAXCOUNT,
    DEFAULT_MAXSIZE,
    DEFAULT_QUALITY,
    DEFAULT_SHUFFLE_SEED,
    MANIFEST,
    SPLITS,
    PipeCommandError,
    ShardError,
    _Output,
    write_shards,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit code (1 when a pipe command or the file system fails, 2 for usage
    errors and an existing output)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inspect"]:
        from pipeline.shard_inspect import main as inspect_main

        return inspect_main(argv[1:])
    if argv[:1] == ["slices"]:
        return slices_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline.shards", description=__doc__.splitlines()[0],
                                     epilog="Check shards with: python -m pipeline.shards inspect PATTERN")
    parser.add_argument("src", type=Path, help="folder with trainA/ trainB/ testA/ testB/")
    parser.add_argument("out", help="output folder for the shards and manifest.json, or pipe:COMMAND with {path}")
    parser.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard at most")
    parser.add_argument("--maxsize", type=int, default=DEFAULT_MAXSIZE, help="bytes per shard at most (1 GB)")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated split folders")
    parser.add_argument("--workers", type=_positive_int, default=1,
                        help="processes that read, verify and encode images (output does not depend on it)")
    parser.add_argument("--resize", type=_positive_int, default=None, metavar="SIDE",
                        help="resize to SIDE x SIDE, bicubic (use data.load_size: training's resize is then skipped)")
    parser.add_argument("--format", choices=["jpeg", "jpg", "png", "webp"], default=None,
                        help="re-encode images in this format (default: keep each image's format)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG/WebP quality of re-encoded images")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=DEFAULT_SHUFFLE_SEED, metavar="S",
                       help=f"seed of the random file order, so each shard is a random subset (default "
                            f"{DEFAULT_SHUFFLE_SEED}; recorded in the manifest)")
    order.add_argument("--no-shuffle", dest="shuffle_seed", action="store_const", const=None,
                       help="keep sorted file order (shards then hold neighbouring files)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no files/s and ETA on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        manifest = write_shards(args.src, args.out, splits, args.maxcount, args.maxsize, args.overwrite,
                                workers=args.workers, resize=args.resize, format=args.format, quality=args.quality,
                                shuffle_seed=args.shuffle_seed, progress=not args.no_progress)
    except (PipeCommandError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = _Output(args.out)
    for split in splits:
        entry = manifest["splits"].get(split)
        if not (args.src / split).is_dir():
            kept = " (shards of an earlier run kept)" if entry else ""
            print(f"{split}: no folder {args.src / split}, not written{kept}")
            continue
        size = sum(s["bytes"] for s in entry["shards"])
        bad = sum(s["split"] == split for s in manifest["skipped"])
        where = output.describe(entry["pattern"]) if entry["pattern"] else "no shards"
        print(f"{split}: {entry['count']} images, {bad} skipped, {len(entry['shards'])} shard(s), "
              f"{size / 1e6:.1f} MB -> {where}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable file(s): listed in {output.describe(MANIFEST)}")
    return 0


def slices_main(argv: Sequence[str]) -> int:
    """`python -m pipeline.shards slices SRC OUT`: NIfTI volumes and DICOM series -> .npy slices (values kept)."""
    from pipeline.data.volumes import VolumeError, write_slices
    from pipeline.data.volumes import __doc__ as volumes_doc

    parser = argparse.ArgumentParser(prog="python -m pipeline.shards slices", description=volumes_doc.splitlines()[0],
                                     epilog="Then shard OUT: python -m pipeline.shards OUT SHARDS")
    parser.add_argument("src", type=Path, help="folder with trainA/ trainB/ testA/ testB/ of volumes")
    parser.add_argument("out", type=Path, help="output folder (the same splits, .npy slices)")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated split folders")
    parser.add_argument("--axis", type=int, default=2, help="volume axis to slice along (default 2)")
    parser.add_argument("--slices", default=":", metavar="START:STOP",
                        help="range of slice indices, Python slice bounds (e.g. 20:140, -40:); default all")
    parser.add_argument("--every", type=_positive_int, default=1, help="keep every N-th slice of the range")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        start, stop = (int(x) if x.strip() else None for x in args.slices.split(":"))
    except ValueError:
        print(f"error: --slices {args.slices!r}: give START:STOP (either may be empty), e.g. 20:140",
              file=sys.stderr)
        return 2
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        counts = write_slices(args.src, args.out, splits, args.axis, start, stop, args.every)
    except VolumeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, count in counts.items():
        print(f"{split}: {count} slices -> {args.out / split}")
    if not counts:
        print(f"error: no split folder ({', '.join(splits)}) in {args.src}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
