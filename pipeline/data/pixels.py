"""Images at their native depth: any supported member decoded to an (H, W, C) array of its stored values,
checked against its domain's settings, and mapped to the [-1, 1] the networks see and back to stored units.

8-bit RGB (the default domain) keeps its own path through PIL (`pipeline.data.images`): its bytes, and so the
golden losses, are unchanged. Everything else (grayscale, 16-bit, int16, float32, multi-band) goes through here.
Members: png (8/16-bit; 16-bit colour PNG through pypng, which Pillow would read as 8 bits), jpg/jpeg/webp, tif/tiff
(any band count, 8/16-bit integer, 32-bit float: `tifffile`) and npy (any array: (H, W), (H, W, C), or (C, H, W)
when C is the domain's channel count and the last axis is not).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from pipeline.config import DEPTH_RANGES, parse_bands, parse_intensity
from pipeline.data.images import display_rgb, to_image

DEPTHS = DEPTH_RANGES
NATIVE_KEYS = ("png", "tif", "tiff", "npy", "jpg", "jpeg", "webp")
# ITU-R BT.601 luma, PIL's own RGB -> L weights: a stray colour image in a grayscale set becomes what PIL gives.
LUMA = np.array([0.299, 0.587, 0.114])


class PixelError(ValueError):
    """An image that its domain's settings cannot take; the message names the image, what it is and the setting."""


@dataclass(frozen=True)
class PixelFormat:
    """What one domain's images are: channels, stored value type, how values map to [-1, 1] (`intensity`: full,
    LOW..HIGH or pLOW..pHIGH; values outside the window are clipped), what to do with images that disagree,
    which bands to show. `key` and `channels_key` are the settings that make it (for messages)."""

    channels: int = 3
    depth: str = "uint8"
    intensity: str = "full"
    mismatch: str = "convert"
    bands: tuple[int, ...] = ()
    key: str = "data.domain_a"
    channels_key: str = "model.channels_a"

    @property
    def is_8bit_rgb(self) -> bool:
        """The default: 8-bit RGB at 0..255, decoded by the unchanged PIL path."""
        return self.channels == 3 and self.depth == "uint8" and self.intensity == "full"

    @property
    def per_image(self) -> bool:
        """Whether each image has its own window (percentiles)."""
        return parse_intensity(self.intensity)[0] == "percentile"

    def window(self, raw: np.ndarray | None = None) -> tuple[float, float]:
        """(low, high): the stored values that map to -1 and 1. Percentile windows are the image's own (`raw`);
        without one, the depth's range (float32: 0..1)."""
        kind, low, high = parse_intensity(self.intensity)
        if kind == "window":
            return low, high
        if kind == "percentile" and raw is not None:
            low, high = (float(v) for v in np.percentile(raw, [low, high]))
            return low, high if high > low else low + 1.0
        return DEPTHS[self.depth] or (0.0, 1.0)

    def display_bands(self) -> tuple[int, ...]:
        """Bands a picture shows: one (grayscale), or three as RGB."""
        if self.bands:
            return self.bands
        return (0,) if self.channels < 3 else (0, 1, 2)

    def describe_display(self) -> str:
        """How pictures of this domain show it: which bands, and which stored values are black and white."""
        if self.per_image:
            window = f"each image's {self.intensity} percentiles"
        else:
            low, high = self.window()
            window = f"stored {low:g}..{high:g}"
        bands = self.display_bands()
        shown = ("grayscale" if len(bands) == 1 and self.channels == 1 else
                 f"band {bands[0]} as grayscale" if len(bands) == 1 else
                 "RGB" if self.channels == 3 and bands == (0, 1, 2) else f"bands {','.join(map(str, bands))} as RGB")
        return f"{self.channels} channel(s) {self.depth}, {shown}, black..white = {window}"

    def to_unit(self, raw: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """(H, W, C) stored values -> float32 in [-1, 1] (the window clipped), and the window used."""
        low, high = self.window(raw)
        x = (np.clip(raw.astype(np.float64), low, high) - low) * (2.0 / (high - low)) - 1.0
        return x.astype(np.float32), (low, high)

    def from_unit(self, x: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
        """[-1, 1] -> stored values of this domain's depth (integers rounded, clipped to the depth's range).
        `window`: the one to invert (a percentile domain's input image's); the configured one when None."""
        low, high = window if window is not None else self.window()
        raw = (np.clip(x.astype(np.float64), -1, 1) + 1.0) * ((high - low) / 2.0) + low
        limits = DEPTHS[self.depth]
        if limits is None:
            return raw.astype(np.float32)
        return np.clip(np.round(raw), *limits).astype(self.depth)

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "depth": self.depth, "intensity": self.intensity,
                "bands": list(self.bands)}


def quantize_to(x: Any, fmt: PixelFormat) -> Any:
    """[-1, 1] images (a torch tensor) rounded to the stored levels of `fmt` over its configured window, staying
    in [-1, 1]: what writing them to a file of its depth and reading them back gives (float32: unchanged)."""
    if DEPTHS[fmt.depth] is None:
        return x
    low, high = fmt.window()
    limits = DEPTHS[fmt.depth]
    raw = ((x.double().clamp(-1, 1) + 1) * ((high - low) / 2) + low).round().clamp(*limits)
    return ((raw.clamp(low, high) - low) * (2.0 / (high - low)) - 1.0).to(x.dtype)


def formats_from(cfg: Any) -> dict[str, PixelFormat]:
    """Domain ("A", "B") -> its PixelFormat, from a training config (model.channels_*, data.domain_*); configs
    written before these settings give 8-bit RGB."""
    out = {}
    for domain in ("a", "b"):
        group = OmegaConf.select(cfg, f"data.domain_{domain}") or {}
        channels = int(OmegaConf.select(cfg, f"model.channels_{domain}", default=3))
        key = f"data.domain_{domain}"
        out[domain.upper()] = PixelFormat(
            channels, str(group.get("depth", "uint8")), str(group.get("intensity", "full")),
            str(group.get("mismatch", "convert")), parse_bands(group.get("bands", ""), channels, f"{key}.bands"),
            key, f"model.channels_{domain}")
    return out


# --- decoding --------------------------------------------------------------------------------------------------

def native_member(sample: dict[str, Any]) -> str | None:
    """The key of the sample's image member (first of NATIVE_KEYS), or None."""
    return next((key for key in NATIVE_KEYS if key in sample), None)


def read_native(data: bytes, ext: str) -> tuple[np.ndarray, str]:
    """Bytes of an image member -> ((H, W, C) array of its stored values, a description of what it is: 'PNG mode
    I;16', 'TIFF uint16 x4', ...). Alpha bands of PNG/JPEG/WebP are dropped; palette images become RGB."""
    ext = ext.lower()
    if ext == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        return _hwc(array), f"npy {array.dtype} {tuple(array.shape)}"
    if ext in ("tif", "tiff"):
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
        array = _tiff_hwc(array, axes)
        return array, f"TIFF {array.dtype} x{array.shape[2]}"
    if ext == "png" and png_bit_depth(data) == 16 and _png_colour_type(data) in (2, 6):
        return _png16_colour(data), "PNG 16-bit RGB"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    mode = img.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX"):
        img = img.convert("RGB")
    elif mode in ("LA", "1"):
        img = img.convert("L")
    elif mode == "I;16B" or mode == "I;16L" or mode == "I;16N":
        img = img.convert("I;16")
    array = np.asarray(img)
    if mode == "I" and ext == "png":  # Older Pillows open 16-bit grayscale PNG as 32-bit I.
        array = array.astype(np.uint16)
    return _hwc(array), f"{ext.upper()} mode {mode}"


def describe_header(data: bytes, ext: str) -> tuple[str, tuple[int, int]]:
    """What an image member holds, from its header: ('RGB 8-bit', (w, h)), ('gray 16-bit', ...), ('uint16 x4',
    ...) for TIFF and npy. What `pipeline.shards inspect` reports per shard."""
    ext = ext.lower()
    if ext == "npy":
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(stream)
        h, w = (shape[0], shape[1]) if len(shape) >= 2 else (0, 0)
        bands = shape[2] if len(shape) == 3 else 1
        return f"{dtype} x{bands}", (int(w), int(h))
    if ext in ("tif", "tiff"):
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            axes, shape, dtype = series.axes.upper(), series.shape, series.dtype
        h, w = shape[axes.index("Y")], shape[axes.index("X")]
        bands = int(np.prod([n for a, n in zip(axes, shape) if a not in "YX"])) if len(shape) > 2 else 1
        return f"{dtype} x{bands}", (int(w), int(h))
    with Image.open(io.BytesIO(data)) as img:
        mode, size = img.mode, img.size
    bits = 16 if (ext == "png" and png_bit_depth(data) == 16) or mode.startswith("I;16") else (
        32 if mode in ("I", "F") else 8)
    kind = {"L": "gray", "LA": "gray+alpha", "1": "bilevel", "P": "palette", "PA": "palette+alpha"}.get(
        mode, "gray" if mode.startswith("I") or mode == "F" else mode)
    if ext == "png" and bits == 16 and _png_colour_type(data) in (2, 6):
        kind = "RGB" if _png_colour_type(data) == 2 else "RGBA"
    return f"{kind} {bits}-bit", size


def _hwc(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3:
        return array
    raise PixelError(f"an array of shape {tuple(array.shape)}: images are (H, W) or (H, W, C)")


def _tiff_hwc(array: np.ndarray, axes: str) -> np.ndarray:
    """A TIFF series as (H, W, C): samples or planes (S, C, I, Q) as channels, wherever tifffile puts them."""
    axes = axes.upper()
    if array.ndim == 2:
        return array[:, :, None]
    if "Y" in axes and "X" in axes and array.ndim == 3:
        band = next(i for i, a in enumerate(axes) if a not in "YX")
        return np.moveaxis(array, band, -1)
    raise PixelError(f"a TIFF of shape {tuple(array.shape)} (axes {axes}): one 2-D image with bands is expected; "
                     "write volumes and time series as one file per slice")


def png_bit_depth(data: bytes) -> int:
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 else 0


def _png_colour_type(data: bytes) -> int:
    return data[25]


def _png16_colour(data: bytes) -> np.ndarray:
    try:
        import png
    except ImportError:
        raise PixelError("a 16-bit colour PNG, which Pillow would read as 8 bits: install pypng (pip install pypng) "
                         "or store the set as 16-bit TIFF") from None
    width, height, rows, info = png.Reader(bytes=data).asDirect()
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    return array[:, :, :3] if info.get("alpha") else array


def conform(array: np.ndarray, fmt: PixelFormat, name: str, what: str) -> tuple[np.ndarray, str | None]:
    """`array` (H, W, C) as the domain's channels and depth, and the kind of conversion made (None: none).

    Raises:
        PixelError: for what cannot be converted (wider values than the depth, other band counts, a non-finite
            float), or for any conversion when `fmt.mismatch` is `error`; the message names the image, what it is
            and the setting to change.
    """
    limits = DEPTHS[fmt.depth]
    if array.dtype.kind in "iu" and array.dtype.itemsize > 2 and limits is not None and array.size and (
            limits[0] <= array.min() and array.max() <= limits[1]):
        array = array.astype(fmt.depth)  # Wide integers (PIL's mode I, npy int64) holding the depth's values.
    if what.startswith("npy") and array.shape[2] != fmt.channels and array.shape[0] == fmt.channels:
        array = np.moveaxis(array, 0, -1)  # (C, H, W), as arrays from other tools often are.
    notes = []
    depth = np.dtype(fmt.depth)
    if array.dtype != depth:
        if _wider(array.dtype, depth):
            raise PixelError(
                f"{name}: a {array.dtype} image ({what}) in {fmt.key}, whose depth is {fmt.depth}: reading it as "
                f"{fmt.depth} would clip it; set {fmt.key}.depth={_depth_name(array.dtype)} (and "
                f"{fmt.key}.intensity) if the set is {_depth_name(array.dtype)}, or convert the file")
        notes.append(f"{array.dtype} images in a {fmt.depth} set")
        array = _widen(array, depth)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise PixelError(f"{name}: a float image ({what}) with NaN or infinite values; fix or remove the file")
    channels = array.shape[2]
    if channels != fmt.channels:
        if channels == 4 and fmt.channels == 3:
            raise PixelError(f"{name}: 4 bands ({what}) in a 3-channel domain; set {fmt.channels_key}=4, or "
                             "store RGB")
        if channels == 3 and fmt.channels == 1:
            notes.append("colour images in a grayscale set (BT.601 luma taken)")
            array = (array.astype(np.float64) @ LUMA)[:, :, None]
            array = np.round(array).astype(depth) if depth.kind in "iu" else array.astype(depth)
        elif channels == 1 and fmt.channels == 3:
            notes.append("grayscale images in a colour set (replicated)")
            array = np.repeat(array, 3, axis=2)
        else:
            raise PixelError(f"{name}: {channels} band(s) ({what}) in a domain of {fmt.channels}: set "
                             f"{fmt.channels_key}={channels} if the set has {channels}, or convert the file")
    if notes and fmt.mismatch == "error":
        raise PixelError(f"{name}: {'; '.join(notes)} ({what}), refused by {fmt.key}.mismatch=error; convert "
                         f"the file, or set {fmt.key}.mismatch=convert")
    return array, "; ".join(notes) or None


def _wider(have: np.dtype, want: np.dtype) -> bool:
    """Whether values of `have` cannot all be held by `want` (a float in an integer set is wider)."""
    if want.kind == "f":
        return False
    if have.kind == "f":
        return True
    return not np.can_cast(have, want)


def _widen(array: np.ndarray, depth: np.dtype) -> np.ndarray:
    """8-bit values in a 16-bit set keep their brightness (x 257: 255 -> 65535); other values keep their units."""
    if array.dtype == np.uint8 and depth == np.uint16:
        return array.astype(np.uint16) * 257
    return array.astype(depth)


def _depth_name(dtype: np.dtype) -> str:
    """The depth setting that holds values of `dtype` exactly (float32 for wider integers: exact to 2**24)."""
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return "uint8" if dtype.itemsize == 1 else "uint16"
    if dtype.kind == "i" and dtype.itemsize <= 2:
        return "int16"
    return "float32"


# --- writing ---------------------------------------------------------------------------------------------------

def output_extension(requested: str, input_name: str, fmt: PixelFormat) -> str:
    """The member/file extension a translation into `fmt` is written with: `requested` (png, tif, npy; keep: the
    input's) when it holds the values losslessly, else tif. PNG holds 8- and 16-bit images of 1 or 3 channels;
    TIFF and npy hold anything."""
    ext = input_name.rsplit(".", 1)[-1].lower() if requested == "keep" else requested
    ext = "tif" if ext == "tiff" else ext
    if ext in ("tif", "npy"):
        return ext
    if ext == "png" and fmt.depth in ("uint8", "uint16") and fmt.channels in (1, 3):
        return "png"
    if ext in ("jpg", "jpeg", "webp") and fmt.depth == "uint8" and fmt.channels in (1, 3) and requested != "keep":
        return ext  # Asked for: lossy, and the user's choice.
    return "tif"


def encode_native(array: np.ndarray, ext: str) -> bytes:
    """(H, W, C) stored values as the bytes of a `ext` file (png, tif, npy; jpg/webp for 8-bit), losslessly
    where the format allows: 16-bit RGB PNG through pypng (Pillow writes no such file)."""
    out = io.BytesIO()
    if ext == "npy":
        np.save(out, array if array.shape[2] > 1 else array[:, :, 0], allow_pickle=False)
    elif ext == "tif":
        import tifffile

        tifffile.imwrite(out, array if array.shape[2] > 1 else array[:, :, 0], compression="zlib",
                         photometric="rgb" if array.shape[2] == 3 else "minisblack",
                         planarconfig="contig")
    elif ext == "png" and array.dtype == np.uint16 and array.shape[2] == 3:
        import png

        png.Writer(array.shape[1], array.shape[0], greyscale=False, bitdepth=16).write(
            out, array.reshape(array.shape[0], -1).tolist())
    else:
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        image.save(out, {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(ext, "PNG"), quality=95)
    return out.getvalue()


def display_image(values: Any, bands: tuple[int, ...] = ()) -> Image.Image:
    """A (C, H, W) tensor in [-1, 1] as an RGB picture to look at (`images.display_rgb`: one channel as
    grayscale, other band counts through `bands`; the window of the domain's intensity mapping spans black to
    white)."""
    return to_image(display_rgb(values.detach().float()[None], bands)[0].cpu())
