"""3-D scans -> 2-D slices that shards can hold: NIfTI volumes (nibabel) and DICOM series (pydicom), values kept.

`python -m pipeline.shards slices SRC OUT [--axis 2] [--slices START:STOP] [--every N]` walks SRC's split folders
(trainA, trainB, testA, testB) and writes, under the same split in OUT, one `.npy` file per slice: the stored
values, in their own type (CT in Hounsfield units as int16, MRI as it was scanned), never rescaled to 8 bits.
`python -m pipeline.shards OUT SHARDS` then shards them like any image folder.

- A NIfTI file (`.nii`, `.nii.gz`) is one volume; its scale slope and intercept are applied when the header
  sets them (the result is float32 unless both keep integers exact).
- A folder of DICOM files (`.dcm`, or files DICOM can read) is one series: slices sorted by their position along
  the patient axis (ImagePositionPatient, else InstanceNumber), RescaleSlope and RescaleIntercept applied (Hounsfield
  units for CT).

Both readers are optional extras (`pip install nibabel pydicom`; the `medical` extra of this package): the
command names the one that is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A volume that cannot be read or sliced, with what to do about it."""


def _need(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise VolumeError(f"reading {extra} needs {module}: pip install {module} (or the `medical` extra)") from None


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI volume's values (3-D), scaled by its header's slope and intercept when they are set."""
    nib = _need("nibabel", "NIfTI volumes")
    image = nib.load(str(path))
    raw = np.asanyarray(image.dataobj.get_unscaled() if hasattr(image.dataobj, "get_unscaled") else image.dataobj)
    slope, intercept = image.dataobj.slope, image.dataobj.inter
    values = _rescaled(raw, slope, intercept)
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise VolumeError(f"'{path}' holds a {values.ndim}-D array {values.shape}: a 3-D volume is expected")
    return values


def read_dicom_series(folder: Path) -> np.ndarray:
    """A folder of DICOM slices as one (slices, rows, columns) volume, sorted along the patient axis, with
    RescaleSlope and RescaleIntercept applied."""
    pydicom = _need("pydicom", "DICOM series")
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path))
        except Exception:  # noqa: BLE001 - not a DICOM file: other files may share the folder
            continue
        if "PixelData" not in ds:
            continue
        slices.append(ds)
    if not slices:
        raise VolumeError(f"'{folder}' holds no DICOM image")
    slices.sort(key=_position)
    shapes = {s.pixel_array.shape for s in slices}
    if len(shapes) > 1:
        raise VolumeError(f"'{folder}' mixes slice sizes {sorted(shapes)}: one series per folder")
    raw = np.stack([s.pixel_array for s in slices])
    slope = float(getattr(slices[0], "RescaleSlope", 1) or 1)
    intercept = float(getattr(slices[0], "RescaleIntercept", 0) or 0)
    return _rescaled(raw, slope, intercept)


def _position(ds) -> tuple[float, float]:
    position = getattr(ds, "ImagePositionPatient", None)
    return (float(position[2]) if position is not None else 0.0, float(getattr(ds, "InstanceNumber", 0) or 0))


def _rescaled(raw: np.ndarray, slope: float | None, intercept: float | None) -> np.ndarray:
    """raw * slope + intercept, in the narrowest type that holds it exactly (int16 for usual CT in HU)."""
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    intercept = 0.0 if intercept is None or not np.isfinite(intercept) else float(intercept)
    if slope == 1.0 and intercept == 0.0:
        return raw
    if raw.dtype.kind in "iu" and slope.is_integer() and intercept.is_integer():
        values = raw.astype(np.int64) * int(slope) + int(intercept)
        for dtype in (np.int16, np.int32):
            if values.min() >= np.iinfo(dtype).min and values.max() <= np.iinfo(dtype).max:
                return values.astype(dtype)
    return (raw.astype(np.float64) * slope + intercept).astype(np.float32)


def volume_sources(folder: Path) -> Iterator[tuple[str, Path]]:
    """(name, path) of the volumes under a split folder: NIfTI files, and folders holding DICOM files."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and is_nifti(path):
            yield relative.rsplit(".nii", 1)[0], path
        elif path.is_dir() and any(p.is_file() and _looks_dicom(p) for p in path.iterdir()):
            yield relative, path


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def slice_volume(values: np.ndarray, axis: int, start: int | None, stop: int | None,
                 every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(index, 2-D slice) along `axis`, from `start` to `stop` (Python slice bounds), every `every`-th."""
    if not 0 <= axis < values.ndim:
        raise VolumeError(f"--axis {axis}: the volume has axes 0..{values.ndim - 1} (shape {values.shape})")
    for index in range(values.shape[axis])[slice(start, stop, every)]:
        yield index, np.ascontiguousarray(np.take(values, index, axis=axis))


def write_slices(src: Path, out: Path, splits: list[str], axis: int = 2, start: int | None = None,
                 stop: int | None = None, every: int = 1) -> dict[str, int]:
    """Every volume of each split of `src` as `.npy` slices under out/<split>/<volume>_<index>.npy; returns the
    slices written per split."""
    counts = {}
    for split in splits:
        folder = src / split
        if not folder.is_dir():
            continue
        counts[split] = 0
        for name, path in volume_sources(folder):
            values = read_nifti(path) if path.is_file() else read_dicom_series(path)
            target = out / split / Path(name).parent
            target.mkdir(parents=True, exist_ok=True)
            for index, plane in slice_volume(values, axis, start, stop, every):
                np.save(target / f"{Path(name).name}_{index:04d}.npy", plane, allow_pickle=False)
                counts[split] += 1
            log.info("%s: %s %s -> slices along axis %d", split, name, values.dtype, axis)
    return counts
