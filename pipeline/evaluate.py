"""Evaluation of trained generators on held-out data: `python -m pipeline.evaluate --checkpoint C`.

For each direction (A->B: G_ab translates test A, compared with the real test B; B->A the reverse):
- FID and KID between the translations and the real target-domain images, on the features of a pluggable
  extractor (`pipeline.metrics.features`: FID's Inception-v3 from a local weight file; nothing is downloaded);
- paired L1, PSNR and SSIM against ground truth matched by sample key, where the test sets are paired (the
  synthetic set), each next to the same error of returning the input unchanged;
- the cycle reconstruction error, mean |G_ba(G_ab(a)) - a| in [-1, 1] units.
Translations are rounded to 8 bits first, so the numbers describe the images `pipeline.translate` writes.
Results are printed, written as JSON, and logged to the checkpoint's MLflow run (`eval/AtoB/fid`, ... at the
checkpoint's step), the same keys periodic evaluation during training uses (`eval.every_steps`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from webdataset.tariterators import tarfile_samples

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.data import DataError, decode_image, expand_pattern, to_tensor
from pipeline.metrics import distribution, paired
from pipeline.metrics.features import FeatureError, find_weights, how_to_provide, load_extractor
from pipeline.translate import (
    DIRECTIONS,
    PRECISIONS,
    add_generator_args,
    iter_inputs,
    load_generators,
    model_overrides,
    required_multiple,
    resize_square,
    select_device,
    translate_images,
)

log = logging.getLogger("pipeline.evaluate")


def _by_key(pattern: str, size: int) -> dict[str, torch.Tensor]:
    out = {}
    for sample in tarfile_samples([{"url": url} for url in expand_pattern(pattern)]):
        out[sample["__key__"]] = to_tensor(decode_image(sample).resize((size, size)))
    return out


@torch.no_grad()
def paired_l1(
    generator: nn.Module, source_pattern: str, target_pattern: str, size: int, device: torch.device,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean absolute error (in [-1, 1] units) of G(source) against paired ground truth, next to doing nothing.

    Pairs are matched by sample key, as the synthetic set writes them. Returns `l1_translation` (G's error),
    `l1_identity` (error of returning the input unchanged) and `pairs`.
    """
    source, target = _by_key(source_pattern, size), _by_key(target_pattern, size)
    keys = sorted(set(source) & set(target))
    if not keys:
        raise DataError(f"no sample keys are shared by '{source_pattern}' and '{target_pattern}': no pairs")
    was_training = generator.training
    generator.eval()
    err_g = err_id = 0.0
    for i in range(0, len(keys), batch_size):
        chunk = keys[i : i + batch_size]
        x = torch.stack([source[k] for k in chunk]).to(device)
        y = torch.stack([target[k] for k in chunk]).to(device)
        err_g += (generator(x).float() - y).abs().mean(dim=(1, 2, 3)).sum().item()
        err_id += (x - y).abs().mean(dim=(1, 2, 3)).sum().item()
    generator.train(was_training)
    return {"l1_translation": err_g / len(keys), "l1_identity": err_id / len(keys), "pairs": float(len(keys))}


# Held-out evaluation of one direction.


def _quantize(x: Tensor) -> Tensor:
    """Round [-1, 1] images to the 256 levels an 8-bit file holds."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class _Features:
    """Runs an extractor over images of any sizes, batching images of equal size; collects (N, D) rows."""

    def __init__(self, extractor: nn.Module | None, device: torch.device, batch_size: int) -> None:
        self.extractor, self.device, self.batch_size = extractor, device, batch_size
        self.pending: dict[tuple[int, ...], list[Tensor]] = {}
        self.rows: list[np.ndarray] = []

    def add(self, image: Tensor) -> None:
        if self.extractor is None:
            return
        group = self.pending.setdefault(tuple(image.shape), [])
        group.append(image)
        if len(group) >= self.batch_size:
            self._run(tuple(image.shape))
        elif sum(map(len, self.pending.values())) > 4 * self.batch_size:  # Many sizes: do not hoard images.
            self._run(max(self.pending, key=lambda shape: len(self.pending[shape])))

    def _run(self, shape: tuple[int, ...]) -> None:
        batch = torch.stack(self.pending.pop(shape)).to(self.device)
        self.rows.append(self.extractor(batch).double().cpu().numpy())

    def result(self) -> np.ndarray:
        for shape in list(self.pending):
            self._run(shape)
        return np.concatenate(self.rows) if self.rows else np.zeros((0, 0))


def _images(source: str, size: int, limit: int) -> Iterator[tuple[str, Tensor]]:
    items = iter_inputs(source)
    for item in itertools.islice(items, limit or None):
        yield item.key, to_tensor(resize_square(item.image, size) if size else item.image)


@torch.no_grad()
def evaluate_direction(
    net: nn.Module, reverse: nn.Module | None, multiple: int, source: str, target: str, device: torch.device,
    features: nn.Module | None = None, size: int = 0, paired_keys: bool = False, batch_size: int = 8,
    precision: str = "fp32", max_images: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000,
) -> dict[str, float]:
    """Metrics of `net` translating the images of `source`, against the real images of `target`.

    Args:
        net: the generator of this direction (its eval mode is used); `reverse` the opposite one or None.
        multiple: side multiple the generators need (`pipeline.translate.required_multiple`).
        source, target: image folders, files or shard patterns (held-out sets of the two domains).
        device: where the networks and the extractor run.
        features: feature extractor for FID/KID ((N, 3, H, W) in [-1, 1] -> (N, D)); None skips them.
        size: resize images to size x size first (the test transform); 0 keeps their sizes.
        paired_keys: `target` holds the ground truth of `source` under the same sample keys.
        batch_size: images per forward pass.
        precision: fp32, bf16 or fp16 for the generators.
        max_images: use at most this many images of each set (0: all).
        kid_subsets, kid_subset_size: KID's subsets.

    Returns:
        `images` and `real_images` (counts); `fid`, `kid`, `kid_subset_size` (0: whole sets) and `kid_std`
        (only over subsets smaller than the sets: see `distribution.kid`) with `features`; `pairs`, `l1`, `psnr`,
        `ssim` and the same of the untranslated input (`*_identity`) when paired; `cycle_l1` with `reverse`.
    """
    modes = [(m, m.training) for m in (net, reverse, features) if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        # Real target images: features, and the ground truth when paired (kept as 8-bit).
        real = _Features(features, device, batch_size)
        truth: dict[str, Tensor] = {}
        real_count = 0
        if paired_keys and max_images:
            # The ground truth of the first max_images sources, not the first max_images of the target set:
            # shards hold their files in a shuffled order, so those would not pair.
            keys = {item.key for item in itertools.islice(iter_inputs(source), max_images)}
            targets: Iterator[tuple[str, Tensor]] = ((k, im) for k, im in _images(target, size, 0) if k in keys)
        else:
            targets = _images(target, size, max_images)
        for key, image in targets:
            real_count += 1
            real.add(image)
            if paired_keys:
                truth[key] = ((image + 1) * 127.5).round().byte()
        real_features = real.result()

        # Translate, and run the reverse generator on the translations as they come (bounded memory).
        fake = _Features(features, device, batch_size)
        inputs: dict[str, Tensor] = {}
        per_image: dict[str, list[float]] = {k: [] for k in ("l1", "psnr", "ssim", "l1_identity", "psnr_identity",
                                                             "ssim_identity", "cycle_l1")}
        count = 0

        def sources() -> Iterator[tuple[str, Tensor]]:
            for key, image in _images(source, size, max_images):
                inputs[key] = image
                yield key, image

        def translations() -> Iterator[tuple[str, Tensor]]:
            nonlocal count
            for key, out in translate_images(net, multiple, sources(), device, batch_size, precision):
                out = _quantize(out)
                count += 1
                fake.add(out)
                if key in truth:
                    _paired(per_image, out, inputs[key], truth.pop(key).float() / 127.5 - 1)
                yield key, out

        if reverse is not None:
            for key, rec in translate_images(reverse, multiple, translations(), device, batch_size, precision):
                per_image["cycle_l1"].append(paired.l1(rec[None], inputs.pop(key)[None]).item())
        else:
            for key, _ in translations():
                inputs.pop(key)
    finally:
        for module, was_training in modes:
            module.train(was_training)

    results: dict[str, float] = {"images": float(count), "real_images": float(real_count)}
    if features is not None:
        fake_features = fake.result()
        results["fid"] = distribution.fid(fake_features, real_features)
        kid = distribution.kid(fake_features, real_features, kid_subsets, kid_subset_size)
        results["kid"] = kid.value
        results["kid_subset_size"] = float(kid.subset_size)
        if kid.std is not None:
            results["kid_std"] = kid.std
    if paired_keys:
        pairs = len(per_image["l1"])
        if not pairs:
            raise DataError(f"no sample keys are shared by '{source}' and '{target}': no pairs")
        results["pairs"] = float(pairs)
        for name in ("l1", "psnr", "ssim", "l1_identity", "psnr_identity", "ssim_identity"):
            results[name] = paired.mean_finite_aware(per_image[name])
    if reverse is not None:
        results["cycle_l1"] = sum(per_image["cycle_l1"]) / max(len(per_image["cycle_l1"]), 1)
    return results


def _paired(per_image: dict[str, list[float]], out: Tensor, source: Tensor, truth: Tensor) -> None:
    if truth.shape != out.shape:
        # Ground truth at another size (only with size=0): compare at the translation's size.
        truth = to_tensor(Image.fromarray(((truth + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
                          .resize((out.shape[-1], out.shape[-2]), Image.BICUBIC))
    for suffix, image in (("", out), ("_identity", source)):
        if image.shape != truth.shape:
            continue
        x, y = image[None], truth[None]
        per_image["l1" + suffix].append(paired.l1(x, y).item())
        per_image["psnr" + suffix].append(paired.psnr(x, y).item())
        per_image["ssim" + suffix].append(paired.ssim(x, y).item())


# Periodic evaluation during training.

_EXTRACTORS: dict[tuple[str, str], nn.Module] = {}


def cached_extractor(path: str, device: torch.device) -> nn.Module:
    """The extractor of a weight file, loaded once per process and device."""
    key = (str(path), str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = load_extractor(path, device)
    return _EXTRACTORS[key]


def held_out_eval(g_ab: nn.Module, g_ba: nn.Module, cfg: Any, device: torch.device) -> dict[str, float]:
    """What training evaluates every `eval.every_steps` and at the end, on data.test_a / data.test_b.

    Always: the cycle error of both directions. With `eval.paired`: `l1_translation`, `l1_identity`, `pairs`
    (`paired_l1` of G_ab) and per-direction L1/PSNR/SSIM. With `eval.features`: FID and KID of both
    directions. Keys: `AtoB/fid`, `BtoA/cycle_l1`, ...
    """
    data, size = cfg.data, cfg.data.crop_size
    out: dict[str, float] = {}
    if cfg.eval.paired:
        out.update(paired_l1(g_ab, data.test_a, data.test_b, size, device, cfg.eval.batch_size))
    features = cached_extractor(cfg.eval.features, device) if cfg.eval.features else None
    multiple = required_multiple(cfg.model.generator)
    for direction, net, reverse, source, target in (("AtoB", g_ab, g_ba, data.test_a, data.test_b),
                                                    ("BtoA", g_ba, g_ab, data.test_b, data.test_a)):
        result = evaluate_direction(net, reverse, multiple, source, target, device, features, size,
                                    paired_keys=cfg.eval.paired, batch_size=cfg.eval.batch_size)
        out.update({f"{direction}/{k}": v for k, v in result.items() if k not in ("images", "real_images")})
    return out


# MLflow.


def log_to_mlflow(uri: str, run_id: str, metrics: dict[str, float], step: int, artifact: Path | None) -> bool:
    """Add `metrics` (and the JSON file) to an existing MLflow run; warn and return False if that fails."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        log.warning("MLflow store %s does not exist here (run from the training's directory, or set "
                    "MLFLOW_TRACKING_URI); results not logged to run %s", uri, run_id)
        return False
    try:
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(uri)
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        client.log_batch(run_id, metrics=batch)
        if artifact is not None:
            client.log_artifact(run_id, str(artifact), "evaluation")
    except Exception as err:  # noqa: BLE001 - tracking never fails an evaluation
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        log.warning("could not log to MLflow run %s at %s (%s); the results are in the JSON file", run_id, uri,
                    reason)
        return False
    return True


# The command.


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def format_results(results: dict[str, dict[str, float]]) -> str:
    lines = []
    for direction, r in results.items():
        head = f"{direction}: {int(r['images'])} translated"
        if "fid" in r:
            head += f" vs {int(r['real_images'])} real | FID {r['fid']:.2f} | KID {r['kid']:.4f}"
            if "kid_std" in r:
                head += f" ± {r['kid_std']:.4f} (subsets of {int(r['kid_subset_size'])})"
            else:
                head += " (whole sets, no spread: no more images than --kid-subset-size)"
        lines.append(head)
        if "pairs" in r:
            lines.append(
                f"  paired ({int(r['pairs'])}): L1 {_fmt(r['l1'])} (input {_fmt(r['l1_identity'])}) | PSNR "
                f"{_fmt(r['psnr'])} dB (input {_fmt(r['psnr_identity'])}) | SSIM {_fmt(r['ssim'])} "
                f"(input {_fmt(r['ssim_identity'])})"
            )
        if "cycle_l1" in r:
            lines.append(f"  cycle reconstruction L1 {_fmt(r['cycle_l1'])}")
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
    except (CheckpointError, ConfigError, DataError, FeatureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    directions = DIRECTIONS if args.direction == "both" else (args.direction,)
    loaded, errors = {}, []
    for direction in directions:
        try:
            loaded[direction] = load_generators(args.checkpoint, direction, model_overrides(args))
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
            args.kid_subsets, args.kid_subset_size,
        )
    print(format_results(results))

    record = {
        "checkpoint": str(args.checkpoint), "step": first.step, "size": size or None,
        "test_a": test["A"], "test_b": test["B"], "paired": is_paired,
        "features": getattr(features, "name", None), "results": results,
    }
    out = args.json or args.checkpoint.with_name(f"eval-{args.checkpoint.stem}.json")
    if args.checkpoint.is_dir() and not args.json:
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
        from pipeline.tracking import resolve_uri

        uri = args.tracking_uri or resolve_uri(cfg.tracking.uri)
        metrics = {f"eval/{d}/{k}": v for d, r in results.items() for k, v in r.items()}
        if log_to_mlflow(uri, run_id, metrics, first.step or 0, out):
            print(f"logged to MLflow run {run_id} at {uri} (step {first.step or 0})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
