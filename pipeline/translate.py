"""Batch translation with a trained generator: `python -m pipeline.translate --checkpoint C --input IN --output OUT`.

Reads a folder of images (subfolders allowed), a single image or WebDataset shards (`pipeline.shards` output),
translates every image at its own size and writes OUT/images/<the input's relative file name>, plus a results
page like the reference implementation's (`OUT/index.html`, input | output per row) and a contact sheet
(`OUT/contact_sheet.png`). `OUT/translations.json` lists what was written.

Any image size works: each image is reflect-padded to the multiple of 2**downsamplings the generator needs (4 for
resnet_*, 2**num_downs for unet_*), translated and cropped back. Images whose padded sizes agree are batched
together. The checkpoint is one of ours (`ckpt-*.pt`: G_ab for AtoB, G_ba for BtoA, architecture from the saved
config) or a reference-implementation weight file (`latest_net_G_A.pth` is A->B, `..._G_B.pth` B->A; its
architecture is read off its keys, or given with `--model.*` options) or a reference folder holding both.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from torch import Tensor, nn
from webdataset.tariterators import tarfile_samples

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.config import ConfigError, from_yaml, load_config
from pipeline.data import DataError, decode_image, expand_pattern, to_tensor
from pipeline.interop import load_into, read_state_dict
from pipeline.models import build_generator, use_group_kernel_instance_norm, uses_group_kernel_norm
from pipeline.shards import EXTENSIONS, list_images, sample_key

log = logging.getLogger("pipeline.translate")

DIRECTIONS = ("AtoB", "BtoA")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_REFERENCE_FILE = re.compile(r"^(?P<prefix>.*_net_)G_(?P<which>[AB])\.pth$")
# The generator settings a reference weight file does not record: given as --model.* options.
MODEL_OPTIONS = ("generator", "ngf", "norm")


# Padding to what the network needs.


def required_multiple(arch: str) -> int:
    """Side multiple a generator needs: its two stride-2 steps (resnet) or 2**num_downs (unet)."""
    if arch.startswith("resnet"):
        return 4
    return 2 ** {"unet_256": 8, "unet_128": 7}[arch]


def padded_size(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source rows of a reflect padding of a length-n axis by (before, after), without F.pad's limit.

    F.pad's reflect needs pads smaller than the side; a small image for a unet_256 needs more. Indexing the
    mirrored, periodic extension (period 2n - 2) equals F.pad's reflect wherever that applies, pads any
    amount, and exports to TorchScript and ONNX without shape-dependent branches.
    """
    idx = torch.arange(-before, n + after, device=device)
    # A tensor, not a Python int: the ONNX exporter cannot take the remainder by a symbolic scalar.
    period = torch.full_like(idx[:1], 2 * n - 2).clamp_min(1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def reflect_pad_to(x: Tensor, height: int, width: int) -> tuple[Tensor, int, int]:
    """Reflect-pad (N, C, h, w) to (N, C, height, width), the padding split evenly between the two sides.

    Returns the padded tensor and the (top, left) offset of the original inside it.
    """
    h, w = x.shape[-2], x.shape[-1]
    top, left = (height - h) // 2, (width - w) // 2
    rows = _reflect_index(h, top, height - h - top, x.device)
    cols = _reflect_index(w, left, width - w - left, x.device)
    return x.index_select(-2, rows).index_select(-1, cols), top, left


class PaddedGenerator(nn.Module):
    """A generator that takes any image size: reflect-pad to `multiple`, translate, crop back.

    This is what `pipeline.export` exports; `translate_images` does the same per image, so that images of
    different sizes can share a batch.
    """

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        m = self.multiple
        padded, top, left = reflect_pad_to(x, (h + m - 1) // m * m, (w + m - 1) // m * m)
        return self.net(padded)[:, :, top : top + h, left : left + w]


# Loading generators.


@dataclass
class Generators:
    """The generator of one direction, the opposite one where known, and where they came from."""

    net: nn.Module
    """Translates the requested direction (eval mode, CPU)."""
    reverse: nn.Module | None
    """The opposite direction (for the cycle error); None for a reference file without its G_A/G_B sibling."""
    model: DictConfig
    """Generator architecture (`model.*` of the config)."""
    cfg: DictConfig
    """The checkpoint's resolved config, or defaults plus overrides for reference files."""
    direction: str
    source: str
    """'checkpoint' (ours) or 'reference' (reference-implementation weight files)."""
    step: int | None = None
    run_id: str | None = None
    """MLflow run id recorded in our checkpoint."""

    @property
    def multiple(self) -> int:
        return required_multiple(self.model.generator)

    def to(self, device: torch.device) -> Generators:
        """Both generators on `device`, their instance norms on the kernel training would use there.

        The kernel is the config's `train.instance_norm_kernel` resolved for `device` as training resolves it,
        so evaluating a checkpoint repeats the computation of the evaluation during training bit for bit.
        """
        group_kernel = uses_group_kernel_norm(self.cfg.train.instance_norm_kernel, device)
        for net in (self.net, self.reverse):
            if net is not None:
                if group_kernel:
                    use_group_kernel_instance_norm(net)
                net.to(device)
        return self


def _reference_files(path: Path, direction: str) -> tuple[Path, Path | None]:
    """(file of `direction`, file of the opposite direction or None) for a reference file or folder."""
    which = "A" if direction == "AtoB" else "B"
    if path.is_dir():
        forward = path / f"latest_net_G_{which}.pth"
        if not forward.is_file():
            raise CheckpointError(f"reference folder '{path}' has no {forward.name} (needed for {direction})")
    else:
        forward = path
        match = _REFERENCE_FILE.match(path.name)
        if match and match["which"] != which:
            wanted = path.with_name(f"{match['prefix']}G_{which}.pth").name
            raise CheckpointError(
                f"'{path.name}' is the reference's G_{match['which']} "
                f"({'A->B' if match['which'] == 'A' else 'B->A'}); for {direction} pass {wanted} or its folder"
            )
    match = _REFERENCE_FILE.match(forward.name)
    if not match:
        return forward, None
    other = forward.with_name(f"{match['prefix']}G_{'B' if which == 'A' else 'A'}.pth")
    return forward, other if other.is_file() else None


def infer_generator_settings(state: dict[str, Tensor]) -> dict[str, Any]:
    """The model.generator / ngf / norm a reference generator state dict implies (empty if unrecognised).

    The reference's files do not record their options, but their keys do: resnet files have `model.1.weight`
    (ngf filters) and one `conv_block` per residual block; unet files nest `model.` once per downsampling.
    The first convolution has a bias exactly for instance norm; batch norm has affine weights after it.
    """
    if "model.1.weight" in state:
        blocks = {key.split(".")[1] for key in state if ".conv_block." in key}
        arch = {6: "resnet_6blocks", 9: "resnet_9blocks"}.get(len(blocks))
        first, norm_weight = "model.1", "model.2.weight"
    elif "model.model.0.weight" in state:
        arch = {7: "unet_128", 8: "unet_256"}.get(max(key.count("model") for key in state) - 1)
        first, norm_weight = "model.model.0", "model.model.1.model.2.weight"
    else:
        return {}
    norm = "instance" if f"{first}.bias" in state else "batch" if norm_weight in state else "none"
    settings = {"ngf": int(state[f"{first}.weight"].shape[0]), "norm": norm}
    return {**settings, "generator": arch} if arch else settings


def load_generators(path: str | Path, direction: str = "AtoB", model_overrides: Sequence[str] = ()) -> Generators:
    """Generators from one of our checkpoints, a reference `*_net_G_{A,B}.pth` file or a reference folder.

    Args:
        path: the checkpoint, weight file or folder.
        direction: AtoB (our G_ab, the reference's G_A) or BtoA.
        model_overrides: `model.generator=...`-style settings for reference files, which do not record their
            architecture (defaults: the paper's resnet_9blocks, ngf 64, instance norm).

    Raises:
        CheckpointError: unreadable file, wrong direction, or weights that do not fit the architecture.
        ConfigError: a bad override.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be AtoB or BtoA, got '{direction}'")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    ckpt = None
    if path.is_file():
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            # A plain state dict is a reference file; anything else that fails to load is reported as ours.
            if "not a training checkpoint" not in str(err) and not _REFERENCE_FILE.match(path.name):
                raise
    if ckpt is not None:
        if model_overrides:
            raise ConfigError(f"'{path}' records its architecture; --model.* options are for reference files only")
        cfg = from_yaml(ckpt["config"])
        names = ("G_ab", "G_ba") if direction == "AtoB" else ("G_ba", "G_ab")
        nets = []
        for name in names:
            net = build_generator(cfg.model.generator, ngf=cfg.model.ngf, norm=cfg.model.norm)
            load_into(net, ckpt["nets"][name], str(path), name)
            nets.append(net.eval())
        return Generators(nets[0], nets[1], cfg.model, cfg, direction, "checkpoint", ckpt.get("step"),
                          ckpt.get("mlflow_run_id") or None)

    forward_file, reverse_file = _reference_files(path, direction)
    states = [read_state_dict(file) if file is not None else None for file in (forward_file, reverse_file)]
    # Settings given explicitly win over those read off the file's keys.
    given = {item.split("=", 1)[0] for item in model_overrides}
    inferred = [f"model.{k}={v}" for k, v in infer_generator_settings(states[0]).items() if f"model.{k}" not in given]
    if inferred:
        log.info("%s: %s (from its keys)", forward_file.name, ", ".join(inferred))
    cfg = load_config(overrides=[*inferred, *model_overrides])
    what = f"{cfg.model.generator} generator (ngf {cfg.model.ngf}, {cfg.model.norm})"
    nets = []
    for file, state in zip((forward_file, reverse_file), states):
        if state is None:
            nets.append(None)
            continue
        net = build_generator(cfg.model.generator, ngf=cfg.model.ngf, norm=cfg.model.norm)
        load_into(net, state, str(file), what)
        nets.append(net.eval())
    return Generators(nets[0], nets[1], cfg.model, cfg, direction, "reference")


# Inputs.


@dataclass
class InputImage:
    name: str
    """Relative file name to write the translation under (the original's, for shards from name.txt)."""
    key: str
    """Sample key (shards) or the key `pipeline.shards` would give the file: pairs images across domains."""
    image: Image.Image


def iter_inputs(source: str, skipped: list[str] | None = None) -> Iterator[InputImage]:
    """The images of a folder (sorted, recursive), a single image file, or a shard pattern (in shard order).

    Unreadable images are logged, appended to `skipped` and left out.
    """
    path = Path(source)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise DataError(f"folder '{source}' holds no images ({', '.join(sorted(EXTENSIONS))})")
        for file in files:
            relative = file.relative_to(path).as_posix()
            try:
                with Image.open(file) as img:
                    image = img.convert("RGB")
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                _skip(skipped, relative, err)
                continue
            yield InputImage(relative, sample_key(relative), image)
        return
    if path.suffix.lower() in EXTENSIONS:
        if not path.is_file():
            raise DataError(f"input image '{source}' does not exist")
        with Image.open(path) as img:
            yield InputImage(path.name, sample_key(path.name), img.convert("RGB"))
        return
    count = 0
    for sample in tarfile_samples([{"url": url} for url in expand_pattern(source)]):
        key = sample["__key__"]
        ext = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), "png")
        name = sample["name.txt"].decode("utf-8") if "name.txt" in sample else f"{key}.{ext}"
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            name = f"{key}.{ext}"  # Never write outside the output folder.
        try:
            image = decode_image(sample)
        except Exception as err:  # noqa: BLE001
            _skip(skipped, name, err)
            continue
        count += 1
        yield InputImage(name, key, image)
    if not count and not skipped:
        raise DataError(f"shard pattern '{source}' holds no samples")


def _skip(skipped: list[str] | None, name: str, err: Exception) -> None:
    log.warning("skipping unreadable image %s (%s: %s)", name, type(err).__name__, err)
    if skipped is not None:
        skipped.append(name)


# Translation.


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def translate_images(net: nn.Module, multiple: int, images: Iterable[tuple[Any, Tensor]], device: torch.device,
                     batch_size: int = 8, precision: str = "fp32") -> Iterator[tuple[Any, Tensor]]:
    """Translate (tag, image) pairs of any sizes; yields (tag, translation) as batches complete.

    Each image (3, h, w) in [-1, 1] is reflect-padded to multiples of `multiple`; images of equal padded size
    form batches of up to `batch_size`. Translations are float32 CPU tensors of the input's size, in [-1, 1];
    they come out grouped by padded size, not in input order. At most 4 * batch_size images wait for their
    batch to fill (then the fullest group runs), so sets of many different sizes do not pile up in memory.
    """
    pending: dict[tuple[int, int], list[tuple[Any, Tensor]]] = {}
    waiting = 0

    def run(group: tuple[int, int]) -> Iterator[tuple[Any, Tensor]]:
        nonlocal waiting
        items = pending.pop(group)
        waiting -= len(items)
        padded, offsets = [], []
        for _, image in items:
            x, top, left = reflect_pad_to(image.to(device)[None], *group)
            padded.append(x)
            offsets.append((top, left, image.shape[-2], image.shape[-1]))
        with _autocast(device, precision):
            out = net(torch.cat(padded))
        out = out.float().cpu()
        for (tag, _), y, (top, left, h, w) in zip(items, out, offsets):
            yield tag, y[:, top : top + h, left : left + w]

    for tag, image in images:
        group = (padded_size(image.shape[-2], multiple), padded_size(image.shape[-1], multiple))
        pending.setdefault(group, []).append((tag, image))
        waiting += 1
        if len(pending[group]) >= batch_size:
            yield from run(group)
        elif waiting > 4 * batch_size:
            yield from run(max(pending, key=lambda g: len(pending[g])))
    for group in list(pending):
        yield from run(group)


def to_image(translation: Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> RGB PIL image (rounded to 8 bits)."""
    array = ((translation.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """The reference's test transform: resize to size x size (bicubic)."""
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


# Results page.

_THUMB = 256


def _thumbnail(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.BICUBIC)


@dataclass
class PageRow:
    name: str
    size: tuple[int, int]
    """The original's width and height."""
    input: Image.Image
    """Thumbnails (at most _THUMB pixels high)."""
    output: Image.Image

    @classmethod
    def of(cls, name: str, source: Image.Image, translation: Image.Image) -> PageRow:
        height = min(_THUMB, source.height)
        return cls(name, source.size, _thumbnail(source, height), _thumbnail(translation, height))


def contact_sheet(rows: Sequence[PageRow], row_height: int = 128) -> Image.Image:
    """One PNG: a row per image, input | output at `row_height`, the file name above each row."""
    label, gutter = 12, 4
    tiles = [(row.name, _thumbnail(row.input, row_height), _thumbnail(row.output, row_height)) for row in rows]
    width = max(a.width + b.width + 3 * gutter for _, a, b in tiles)
    sheet = Image.new("RGB", (width, len(tiles) * (row_height + label + gutter) + gutter), "white")
    draw = ImageDraw.Draw(sheet)
    y = gutter
    for name, a, b in tiles:
        draw.text((gutter, y), name[-(width // 6) :], fill="black")
        y += label
        sheet.paste(a, (gutter, y))
        sheet.paste(b, (2 * gutter + a.width, y))
        y += row_height + gutter
    return sheet


def write_page(out: Path, rows: Sequence[PageRow], title: str, total: int) -> None:
    """index.html like the reference's results page: a table row per image, input and output side by side."""
    (out / "page").mkdir(parents=True, exist_ok=True)
    lines = [
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif}td{padding:4px;text-align:center;vertical-align:top}"
        "img{max-height:256px}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        f"<p>{len(rows)} of {total} images shown; all translations are in <a href='images/'>images/</a>. "
        "<a href='contact_sheet.png'>Contact sheet</a>.</p>",
        "<table><tr><th>name</th><th>input</th><th>output</th></tr>",
    ]
    for i, row in enumerate(rows):
        row.input.save(out / "page" / f"{i:05d}-input.png")
        row.output.save(out / "page" / f"{i:05d}-output.png")
        lines.append(
            f"<tr><td>{html.escape(row.name)}<br>{row.size[0]}x{row.size[1]}</td>"
            f"<td><img src='page/{i:05d}-input.png'></td>"
            f"<td><a href='images/{html.escape(row.name)}'><img src='page/{i:05d}-output.png'></a></td></tr>"
        )
    lines += ["</table></body></html>", ""]
    (out / "index.html").write_text("\n".join(lines), encoding="utf-8")


# The command.


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)  # Used by JPEG and WebP; lossless PNG ignores it.


def output_name(name: str, ext: str) -> str:
    """The file name a translation is written under: the input's, or with its extension changed to `ext`."""
    if ext == "keep":
        return name
    return str(Path(name).with_suffix("." + ext).as_posix())


def translate_source(gens: Generators, source: str, out: Path, device: torch.device, batch_size: int = 8,
                     precision: str = "fp32", size: int = 0, ext: str = "keep", page_rows: int = 100,
                     sheet_rows: int = 16, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Translate every image of `source` into `out/images/`, write the results page; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    net = gens.to(device).net.eval()
    skipped: list[str] = []
    inputs: dict[str, InputImage] = {}
    files: list[dict[str, Any]] = []
    page: list[PageRow] = []

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for item in iter_inputs(source, skipped):
            if size:
                item.image = resize_square(item.image, size)
            inputs[item.name] = item
            yield item.name, to_tensor(item.image)

    # Encoding and writing files overlaps with the next batch's forward pass.
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = []
        for name, translation in translate_images(net, gens.multiple, tensors(), device, batch_size, precision):
            item = inputs.pop(name)
            image = to_image(translation)
            target = output_name(name, ext)
            writes.append(pool.submit(_save, image, out / "images" / target))
            files.append({"name": target, "input": name, "key": item.key, "width": image.width,
                          "height": image.height})
            if len(page) < max(page_rows, sheet_rows):
                page.append(PageRow.of(target, item.image, image))
            if progress is not None:
                progress(len(files))
        for write in writes:
            write.result()
    if not files:
        raise DataError(f"no readable image in '{source}'")
    files.sort(key=lambda f: f["input"])
    page.sort(key=lambda row: row.name)
    title = f"{gens.direction} translations of {source}"
    contact_sheet(page[:sheet_rows]).save(out / "contact_sheet.png")
    write_page(out, page[:page_rows], title, len(files))
    manifest = {"source": source, "direction": gens.direction, "count": len(files), "skipped": skipped,
                "size": size or None, "files": files}
    (out / "translations.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def add_generator_args(parser: argparse.ArgumentParser, directions: Sequence[str] = DIRECTIONS,
                       default: str = "AtoB") -> None:
    """--checkpoint, --direction and the --model.* options of reference files (shared with evaluate, export)."""
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="our ckpt-*.pt, a reference *_net_G_A.pth / *_net_G_B.pth file, or a reference folder")
    parser.add_argument("--direction", choices=directions, default=default,
                        help="AtoB uses G_ab (reference G_A), BtoA G_ba (reference G_B)")
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
    parser.add_argument("--ext", choices=("keep", "png", "jpg", "webp"), default="keep",
                        help="output format: keep each input's file name and format (default), or convert")
    parser.add_argument("--page-rows", type=int, default=100, help="images shown on index.html")
    parser.add_argument("--sheet-rows", type=int, default=16, help="images in contact_sheet.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    try:
        device = select_device(args.device)
        gens = load_generators(args.checkpoint, args.direction, model_overrides(args))
        log.info("translating %s with %s (%s, %s) on %s", args.input, args.checkpoint, args.direction,
                 gens.model.generator, device)
        manifest = translate_source(
            gens, args.input, args.output, device, args.batch_size, args.precision, args.size, args.ext,
            args.page_rows, args.sheet_rows,
            progress=lambda n: n % 500 == 0 and log.info("%d images translated", n),
        )
    except (CheckpointError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = f", {len(manifest['skipped'])} unreadable skipped" if manifest["skipped"] else ""
    print(f"{manifest['count']} images translated {args.direction} into {args.output / 'images'}{skipped}; "
          f"results page {args.output / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
