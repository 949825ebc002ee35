"""Evaluation of trained generators on held-out data: `python -m pipeline.evaluate --checkpoint C`.

For each direction (A->B: G_ab translates test A, compared with the real test B; B->A the reverse):
- FID and KID between the translations and the real target-domain images, on the features of a pluggable
  extractor (`pipeline.eval.metrics.features`: FID's Inception-v3 from a local weight file; nothing is downloaded);
- paired L1, PSNR and SSIM against ground truth matched by sample key, where the test sets are paired (the
  synthetic set), each next to the same error of returning the input unchanged;
- the cycle reconstruction error, mean |G_ba(G_ab(a)) - a| in [-1, 1] units.
Translations are rounded to 8 bits first, so the numbers describe the images `pipeline.translate` writes.
Results are printed, written as JSON, and logged to the checkpoint's MLflow run (`eval/AtoB/fid`, ... at the
checkpoint's step), the same keys periodic evaluation during training uses (`eval.every_steps`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.stream import DataError
from pipeline.engine.checkpoint import CheckpointError, is_checkpoint_directory
from pipeline.eval.evaluate import (
    evaluate_direction,
    log,
)
from pipeline.eval.metrics.features import FeatureError, find_weights, how_to_provide, load_extractor
from pipeline.infer.generators import DIRECTIONS, PRECISIONS, load_generators
from pipeline.infer.translate import select_device
from pipeline.logs import one_line
from pipeline.tracking.trackers import log_to_existing_run, resolve_uri
from pipeline.translate import add_generator_args, model_overrides

# The command.


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def format_results(results: dict[str, dict[str, float]]) -> str:
    lines = []
    for direction, r in results.items():
        head = f"{direction}: {int(r['images'])} translated"
        tag = next((t for t in ("", "_replicated") if f"fid{t}" in r), None)
        if tag is not None:
            head += (f" vs {int(r['real_images'])} real | FID {r['fid' + tag]:.2f} | KID {r['kid' + tag]:.4f}")
            if f"kid{tag}_std" in r:
                head += f" ± {r['kid' + tag + '_std']:.4f} (subsets of {int(r['kid' + tag + '_subset_size'])})"
            else:
                head += " (whole sets, no spread: no more images than --kid-subset-size)"
            if tag:
                head += " [1-channel images replicated to 3 for the extractor]"
        lines.append(head)
        if "pairs" in r:
            lines.append(
                f"  paired ({int(r['pairs'])}): L1 {_fmt(r['l1'])} (input {_fmt(r['l1_identity'])}) | PSNR "
                f"{_fmt(r['psnr'])} dB (input {_fmt(r['psnr_identity'])}) | SSIM {_fmt(r['ssim'])} "
                f"(input {_fmt(r['ssim_identity'])})"
            )
        if "l1_units" in r:
            lines.append(f"  L1 in stored units {r['l1_units']:.6g} (input {r['l1_units_identity']:.6g})")
        if "cycle_l1" in r:
            lines.append(f"  cycle reconstruction L1 {_fmt(r['cycle_l1'])}")
        bands = sorted({int(k[4:].split("_")[0]) for k in r if k.startswith("band")})
        for band in bands:
            lines.append(f"  band {band}: mean {r[f'band{band}_mean']:.6g} (real {r[f'band{band}_mean_real']:.6g}), "
                         f"spread {r[f'band{band}_std']:.6g} (real {r[f'band{band}_std_real']:.6g})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.splitlines()[0])
    add_generator_args(parser, directions=(*DIRECTIONS, "both"), default="both")
    parser.add_argument("--test-a", help="held-out domain A: folder or shards (default: the checkpoint's data.test_a)")
    parser.add_argument("--test-b", help="held-out domain B (default: the checkpoint's data.test_b)")
    parser.add_argument("--features", help="feature extractor file for FID/KID (Inception weights; see below)")
    parser.add_argument("--size", type=int, default=None,
                        help="resize images to SIZE x SIZE (default: the checkpoint's data.crop_size); 0 keeps sizes")
    paired_group = parser.add_mutually_exclusive_group()
    paired_group.add_argument("--paired", dest="paired", action="store_true", default=None,
                              help="test sets are paired by sample key (default: the checkpoint's eval.paired)")
    paired_group.add_argument("--unpaired", dest="paired", action="store_false")
    parser.add_argument("--max-images", type=int, default=0, help="images per set at most (0: all)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID's random subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="images per KID subset (default 1000, as torch-fidelity); sets no larger than this "
                             "are scored whole, once, with no spread")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass (default: the checkpoint's eval.batch_size, as in training)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--json", type=Path, help="output file (default: eval-<checkpoint name>.json beside it)")
    parser.add_argument("--run-id", help="MLflow run to log to (default: the one recorded in the checkpoint)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the checkpoint's tracking.uri, else "
                        "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.epilog = how_to_provide()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except (CheckpointError, ConfigError, DataError, FeatureError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    directions = DIRECTIONS if args.direction == "both" else (args.direction,)
    loaded, errors = {}, []
    for direction in directions:
        try:
            loaded[direction] = load_generators(args.checkpoint, direction, model_overrides(args), args.weights)
        except CheckpointError as err:
            errors.append(err)
    if not loaded:
        raise errors[0]
    for err in errors:
        # "both" with a reference file of one direction: evaluate that one.
        log.warning("%s not evaluated: %s", (set(directions) - set(loaded)).pop(), err)
    first = next(iter(loaded.values()))
    cfg = first.cfg
    test = {"A": args.test_a or cfg.data.test_a, "B": args.test_b or cfg.data.test_b}
    for domain, pattern in test.items():
        if not pattern:
            raise ConfigError(f"no held-out set for domain {domain}: pass --test-{domain.lower()}")
    size = cfg.data.crop_size if args.size is None else args.size
    is_paired = cfg.eval.paired if args.paired is None else args.paired

    weights = find_weights(args.features)
    features = None
    if weights is None:
        print("FID/KID skipped: no Inception weights found.\n" + how_to_provide(), file=sys.stderr)
    else:
        features = load_extractor(weights, device)
        log.info("features: %s", features.name)

    results: dict[str, dict[str, float]] = {}
    for direction, gens in loaded.items():
        source, target = (test["A"], test["B"]) if direction == "AtoB" else (test["B"], test["A"])
        log.info("evaluating %s: %s -> compared with %s", direction, source, target)
        gens.to(device)
        results[direction] = evaluate_direction(
            gens.net, gens.reverse, gens.multiple, source, target, device, features, size, is_paired,
            args.batch_size or cfg.eval.batch_size, args.precision, args.max_images,
            args.kid_subsets, args.kid_subset_size, formats=gens.formats(),
        )
    print(format_results(results))

    record = {
        "checkpoint": str(args.checkpoint), "step": first.step, "size": size or None,
        "test_a": test["A"], "test_b": test["B"], "paired": is_paired,
        "features": getattr(features, "name", None), "results": results,
    }
    out = args.json or args.checkpoint.with_name(f"eval-{args.checkpoint.stem}.json")
    if args.checkpoint.is_dir() and not is_checkpoint_directory(args.checkpoint) and not args.json:
        out = args.checkpoint / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {out}")

    run_id = args.run_id or first.run_id
    if args.no_mlflow:
        pass
    elif not run_id:
        log.info("no MLflow run recorded in %s (pass --run-id to log there)", args.checkpoint)
    else:
        uri = args.tracking_uri or resolve_uri(cfg.tracking.uri)
        metrics = {f"eval/{d}/{k}": v for d, r in results.items() for k, v in r.items()}
        if log_to_existing_run(uri, run_id, metrics, first.step or 0, out, "evaluation"):
            print(f"logged to MLflow run {run_id} at {uri} (step {first.step or 0})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
