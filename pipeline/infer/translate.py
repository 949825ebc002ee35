"""Translating images with loaded generators: inputs from folders, files or shards, batched by padded size,
written as files plus a results page and a contact sheet.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from pipeline.config import ConfigError
from pipeline.data.held_out import InputImage, NativeImage, as_tensor, iter_inputs
from pipeline.data.images import resize_square, to_image
from pipeline.data.pixels import display_image, encode_native, output_extension
from pipeline.data.stream import DataError
from pipeline.engine.progress import Progress
from pipeline.infer.generators import (
    PRECISIONS,
    Generators,
    padded_size,
    reflect_pad_to,
)
from pipeline.infer.tiled import TiledForward

# Inputs.


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


@torch.no_grad()
def translate_tiled(net: nn.Module, multiple: int, images: Iterable[tuple[Any, Tensor]], device: torch.device,
                    tile: int, precision: str = "fp32", progress: Progress | None = None,
                    ) -> Iterator[tuple[Any, Tensor]]:
    """`translate_images` one image at a time, each layer of the generator tile by tile (`TiledForward`): the
    same translations (up to float rounding) with device memory bounded by `tile`, for images of any size.

    `progress` counts tiles; its total grows by each image's count as the image starts.
    """
    runner = TiledForward(tile, device, PRECISIONS[precision], on_tile=progress.update if progress else None)
    for tag, image in images:
        padded, top, left = reflect_pad_to(image[None], padded_size(image.shape[-2], multiple),
                                           padded_size(image.shape[-1], multiple))
        if progress is not None:
            progress.total = (progress.total or 0) + runner.count_tiles(net, tuple(padded.shape))
        out = runner(net, padded)
        yield tag, out[0, :, top : top + image.shape[-2], left : left + image.shape[-1]]


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


def _write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


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
                     sheet_rows: int = 16, progress: Callable[[int], None] | None = None, tile: int = 0,
                     tile_progress: Progress | None = None) -> dict[str, Any]:
    """Translate every image of `source` into `out/images/`, write the results page; returns the manifest.

    `tile` > 0 translates each image layer by layer in tiles of that many pixels (`translate_tiled`), counting
    them on `tile_progress`.
    """
    out.mkdir(parents=True, exist_ok=True)
    net = gens.to(device).net.eval()
    skipped: list[str] = []
    inputs: dict[str, InputImage] = {}
    files: list[dict[str, Any]] = []
    page: list[PageRow] = []
    source_fmt, target_fmt = gens.formats()

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for item in iter_inputs(source, skipped, source_fmt):
            if size:
                item.image = (NativeImage(as_tensor(item.image, size), item.image.window)
                              if isinstance(item.image, NativeImage) else resize_square(item.image, size))
            inputs[item.name] = item
            yield item.name, as_tensor(item.image)

    # Encoding and writing files overlaps with the next batch's forward pass.
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = []
        translations = (translate_tiled(net, gens.multiple, tensors(), device, tile, precision, tile_progress)
                        if tile else translate_images(net, gens.multiple, tensors(), device, batch_size, precision))
        for name, translation in translations:
            item = inputs.pop(name)
            if target_fmt.is_8bit_rgb and not isinstance(item.image, NativeImage):
                image = to_image(translation)
                target = output_name(name, ext)
                writes.append(pool.submit(_save, image, out / "images" / target))
                shown = item.image
            else:
                target = output_name(name, output_extension(ext, name, target_fmt))
                window = (item.image.window if isinstance(item.image, NativeImage) and target_fmt.per_image
                          and source_fmt.per_image else None)
                values = target_fmt.from_unit(translation.permute(1, 2, 0).numpy(), window)
                writes.append(pool.submit(_write_bytes, encode_native(values, target.rsplit(".", 1)[-1]),
                                          out / "images" / target))
                image = display_image(translation, target_fmt.bands)
                shown = (display_image(item.image.values, source_fmt.bands) if isinstance(item.image, NativeImage)
                         else item.image)
            files.append({"name": target, "input": name, "key": item.key, "width": image.width,
                          "height": image.height})
            if len(page) < max(page_rows, sheet_rows):
                page.append(PageRow.of(target, shown, image))
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
    if not target_fmt.is_8bit_rgb:
        # How the files' values relate to what the networks saw: a reader can map them back.
        manifest["target_format"] = {**target_fmt.to_dict(), "window": list(target_fmt.window())}
    (out / "translations.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
