"""Images beyond 8-bit RGB: grayscale, 16-bit, int16 and float, multi-band; read at their depth, mapped to
[-1, 1] as configured, written back in their units; every image a domain cannot take named with the fix."""

from __future__ import annotations

import functools
import io
import json
import logging
import random
import tarfile

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.data.held_out import held_out, lazy_inputs
from pipeline.data.pixels import PixelFormat, conform, describe_header, encode_native, formats_from, read_native
from pipeline.data.shard_inspect import inspect_shards
from pipeline.data.shards import write_shards
from pipeline.data.stream import Augment, DataError, DomainStream
from pipeline.data.volumes import write_slices
from pipeline.gan.cyclegan import build_networks
from pipeline.infer.export import check_export, export_onnx, export_torchscript
from pipeline.infer.generators import Generators, PaddedGenerator, load_generators
from pipeline.infer.interop import export_reference
from pipeline.infer.tiled import TiledForward
from pipeline.infer.translate import translate_source
from pipeline.train.samples import sample_grid

GRAY16 = PixelFormat(1, "uint16", key="data.domain_a", channels_key="model.channels_a")


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def tif(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, photometric="minisblack", planarconfig="contig" if array.ndim == 3 else None)
    return out.getvalue()


def levels16(seed: int, size: int = 32) -> np.ndarray:
    """A 16-bit image that 8 bits cannot hold: neighbouring levels, the extremes, values above 255."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 65536, (size, size)).astype(np.uint16)
    image[0, :4] = [0, 1, 65534, 65535]
    image[1, :3] = [1000, 1001, 1002]
    return image


def shard_folder(root, files: dict[str, bytes], split: str = "trainA"):
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    write_shards(root / "images", root / "shards", splits=[split], maxcount=64, shuffle_seed=None)
    return str(root / "shards" / split / "*.tar")


def stream_of(pattern: str, fmt: PixelFormat, size: int = 32) -> DomainStream:
    from pipeline.data.stream import expand_pattern

    return DomainStream(expand_pattern(pattern), "seed", Augment("none", size, size, flip=False), shuffle_buffer=1,
                        label="domain A", fmt=fmt)


class Identity(nn.Module):
    """A 'generator' that returns its input: what goes in must come out, to the level."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def identity_gens(overrides: list[str]) -> Generators:
    cfg = load_config([], ["model.generator=resnet_6blocks", *overrides])
    return Generators(Identity(), None, cfg.model, cfg, "AtoB", "checkpoint")


# --- 16-bit and float values survive shard -> decode -> [-1, 1] -> translate -> file ----------------------------


def test_a_16_bit_value_survives_shards_training_decode_and_translation_to_16_bit_png(tmp_path):
    images = {f"{i:02d}.png": png(levels16(i)) for i in range(3)}
    pattern = shard_folder(tmp_path, images)
    # Training's decode: [-1, 1] floats that map back to every stored level exactly (no 8-bit step).
    stream = stream_of(pattern, GRAY16)
    seen = [next(stream.iterate()) for _ in range(1)]
    assert seen[0].dtype == torch.float32 and seen[0].shape == (1, 32, 32)
    originals = {levels16(i).tobytes() for i in range(3)}
    back = GRAY16.from_unit(seen[0].permute(1, 2, 0).numpy())[:, :, 0]
    assert back.tobytes() in originals
    assert len(np.unique(back)) > 256 and back.max() > 255  # Nothing clipped to 8 bits.
    # Translate with a generator that returns its input: the 16-bit PNG written holds the input's levels.
    gens = identity_gens(["model.channels_a=1", "model.channels_b=1", "data.domain_a.depth=uint16",
                          "data.domain_b.depth=uint16"])
    manifest = translate_source(gens, pattern, tmp_path / "out", torch.device("cpu"))
    assert manifest["target_format"]["depth"] == "uint16" and manifest["count"] == 3
    for i in range(3):
        written = Image.open(tmp_path / "out" / "images" / f"{i:02d}.png")
        assert written.mode == "I;16"
        diff = np.abs(np.asarray(written).astype(np.int64) - levels16(i).astype(np.int64))
        assert diff.max() <= 1, diff.max()  # Within one level of the mapping's quantisation (here: exact).


def test_a_4_band_float32_tiff_survives_within_float32_round_off(tmp_path):
    rng = np.random.default_rng(0)
    bands = [(rng.random((24, 24, 4)) * 1000).astype(np.float32) for _ in range(2)]
    pattern = shard_folder(tmp_path, {f"{i}.tif": tif(b) for i, b in enumerate(bands)})
    overrides = ["model.channels_a=4", "model.channels_b=4", "data.domain_a.depth=float32",
                 "data.domain_b.depth=float32", "data.domain_a.intensity=0..1000", "data.domain_b.intensity=0..1000"]
    gens = identity_gens(overrides)
    translate_source(gens, pattern, tmp_path / "out", torch.device("cpu"))
    for i, original in enumerate(bands):
        written = tifffile.imread(tmp_path / "out" / "images" / f"{i}.tif")
        assert written.dtype == np.float32 and written.shape == (24, 24, 4)
        np.testing.assert_allclose(written, original, rtol=0, atol=1000 * 2e-7)


def test_windowed_int16_ct_values_map_clip_and_come_back_in_hounsfield_units():
    fmt = PixelFormat(1, "int16", "-1000..1000")
    hu = np.array([[-3024, -1000, -999, 0, 40, 999, 1000, 3071]], dtype=np.int16)[:, :, None]
    unit, window = fmt.to_unit(hu)
    assert window == (-1000.0, 1000.0)
    assert unit.min() == -1.0 and unit.max() == 1.0  # Outside the window: clipped, as the setting states.
    back = fmt.from_unit(unit)
    assert back.dtype == np.int16
    assert back[0, :, 0].tolist() == [-1000, -1000, -999, 0, 40, 999, 1000, 1000]


def test_per_image_percentiles_map_each_image_by_its_own_window():
    fmt = PixelFormat(1, "uint16", "p1..p99")
    dim = np.linspace(100, 200, 101).astype(np.uint16)[None, :, None]
    bright = dim * 100
    for image in (dim, bright):
        unit, window = fmt.to_unit(image)
        assert abs(unit.min() + 1) < 1e-6 and abs(unit.max() - 1) < 1e-6
        assert window[0] > image.min() and window[1] < image.max()


# --- what a domain cannot take, named with the fix --------------------------------------------------------------


def test_a_16_bit_file_read_by_an_8_bit_configuration_is_an_error_naming_file_mode_and_setting(tmp_path):
    rgb = png(np.full((32, 32, 3), 90, np.uint8))
    pattern = shard_folder(tmp_path, {"ok.png": rgb, "deep.png": png(levels16(0))})
    with pytest.raises(DataError) as err:
        for _, _ in zip(range(4), stream_of(pattern, PixelFormat()).iterate()):
            pass
    message = str(err.value)
    assert "deep" in message and "mode I;16" in message and "16-bit" in message
    assert "data.domain_a.depth=uint16" in message and "would clip" in message


def test_a_16__bit_colour_png_that_pillow_would_read_as_8_bits_is_refused_by_an_8_bit_domain(tmp_path):
    import png as pypng

    out = io.BytesIO()
    pypng.Writer(8, 8, greyscale=False, bitdepth=16).write(out, (np.arange(8 * 24).reshape(8, 24) * 300).tolist())
    pattern = shard_folder(tmp_path, {"ok.png": png(np.zeros((8, 8, 3), np.uint8)), "wide.png": out.getvalue()})
    with pytest.raises(DataError, match=r"wide.*16-bit.*data.domain_a.depth=uint16"):
        for _, _ in zip(range(4), stream_of(pattern, PixelFormat(), size=8).iterate()):
            pass
    # Read at its depth, it keeps its values (pypng decodes what Pillow cannot).
    array, what = read_native(out.getvalue(), "png")
    assert array.dtype == np.uint16 and array.shape == (8, 8, 3) and array.max() > 255 and "16-bit RGB" in what


def test_a_stray_colour_file_in_a_grayscale_set_is_converted_and_counted_or_refused(tmp_path, caplog):
    gray = {f"g{i}.png": png(np.full((32, 32), 40 * i, np.uint8)) for i in range(3)}
    pattern = shard_folder(tmp_path, {**gray, "stray.png": png(np.full((32, 32, 3), (200, 10, 10), np.uint8))})
    fmt = PixelFormat(1, "uint8")
    stream = stream_of(pattern, fmt)
    with caplog.at_level(logging.WARNING, "pipeline.data"):
        images = [x for _, x in zip(range(8), stream.iterate())]
    assert all(x.shape == (1, 32, 32) for x in images)
    assert stream.skips.conversions == {"colour images in a grayscale set (BT.601 luma taken)": 2}  # Two passes.
    assert any("converting" in r.message and "stray" in r.message for r in caplog.records)
    refused = stream_of(pattern, PixelFormat(1, "uint8", mismatch="error"))
    with pytest.raises(DataError) as err:
        for _, _ in zip(range(8), refused.iterate()):
            pass
    assert "stray" in str(err.value) and "data.domain_a.mismatch=error" in str(err.value)
    assert "data.domain_a.mismatch=convert" in str(err.value)


def test_wide_integers_holding_the_depths_values_are_taken_as_it():
    """PIL's 32-bit mode I and npy int64 arrays of HU: their values fit, so nothing is converted or refused."""
    hu = np.array([[-1024, 0, 3071]], dtype=np.int64)[:, :, None]
    array, note = conform(hu, PixelFormat(1, "int16", "-1024..3071"), "ct.npy", "npy int64")
    assert array.dtype == np.int16 and note is None and array[0, :, 0].tolist() == [-1024, 0, 3071]


def test_8_bit_files_in_a_16_bit_set_keep_their_brightness_with_a_warning_or_are_refused():
    eight = np.array([[0, 1, 128, 255]], np.uint8)[:, :, None]
    array, note = conform(eight, GRAY16, "x.png", "PNG mode L")
    assert array.dtype == np.uint16 and array[0, :, 0].tolist() == [0, 257, 32896, 65535]
    assert note == "uint8 images in a uint16 set"
    strict = PixelFormat(1, "uint16", mismatch="error", key="data.domain_b", channels_key="model.channels_b")
    with pytest.raises(ValueError, match=r"x.png: uint8 images in a uint16 set .*data.domain_b.mismatch=error"):
        conform(eight, strict, "x.png", "PNG mode L")


@pytest.mark.parametrize("array,fmt,needle", [
    (np.zeros((4, 4, 4), np.uint8), PixelFormat(), "set model.channels_a=4"),
    (np.zeros((4, 4, 2), np.uint16), PixelFormat(5, "uint16"), "set model.channels_a=2"),
    (np.zeros((4, 4, 1), np.float32), GRAY16, "set data.domain_a.depth=float32"),
    (np.zeros((4, 4, 1), np.int16), PixelFormat(1, "uint8"), "set data.domain_a.depth=int16"),
    (np.full((4, 4, 1), np.nan, np.float32), PixelFormat(1, "float32", "0..1"), "NaN or infinite"),
    (np.full((4, 4, 1), -70_000, np.int32), PixelFormat(1, "int16", "-1000..1000"), "set data.domain_a.depth=float32"),
], ids=["4-bands-in-rgb", "2-bands-in-5", "float-in-16-bit", "int16-in-8-bit", "nan", "int32-beyond-int16"])
def test_images_a_domain_cannot_take_are_errors_naming_the_setting(array, fmt, needle):
    with pytest.raises(ValueError) as err:
        conform(array, fmt, "shard.tar:sample", "TIFF")
    assert "shard.tar:sample" in str(err.value) and needle in str(err.value)


def test_grayscale_files_in_the_default_rgb_domain_are_counted_and_can_be_refused(tmp_path):
    pattern = shard_folder(tmp_path, {"rgb.png": png(np.full((32, 32, 3), 9, np.uint8)),
                                      "gray.png": png(np.full((32, 32), 7, np.uint8))})
    stream = stream_of(pattern, PixelFormat())
    [x for _, x in zip(range(4), stream.iterate())]
    assert stream.skips.conversions == {"grayscale images in a colour set (replicated)": 2}
    with pytest.raises(DataError, match=r"gray.*mode L.*data.domain_a.mismatch=error"):
        [x for _, x in zip(range(4), stream_of(pattern, PixelFormat(mismatch="error")).iterate())]


@pytest.mark.parametrize("overrides,needle", [
    (["model.channels_a=4"], "set loss.lambda_idt=0"),
    (["model.channels_a=1", "loss.lambda_idt=0", "model.g_variant=colour"], "use model.g_variant=reference"),
    (["model.method=fastcut", "model.channels_a=3", "model.channels_b=4"], "one of them must be 1"),
    (["data.domain_b.depth=float32"], "data.domain_b.intensity to a window"),
    (["data.domain_a.intensity=-1000:1000"], "LOW..HIGH"),
    (["data.domain_a.intensity=p5..p200"], "within 0..100"),
    (["model.channels_a=4", "loss.lambda_idt=0", "data.domain_a.bands=3,2,7"], "within 0..3"),
    (["data.domain_a.depth=uint12"], "choose one of: uint8, uint16, int16, float32"),
    (["model.channels_b=0"], "'model.channels_b' must be positive"),
])
def test_settings_that_cannot_work_together_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert needle in str(err.value)


# --- decoding and inspecting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hwc", "chw", "hw"])
def test_npy_members_are_read_in_either_channel_layout(layout):
    hwc = np.arange(5 * 6 * 4, dtype=np.int16).reshape(5, 6, 4)
    stored = {"hwc": hwc, "chw": np.moveaxis(hwc, -1, 0), "hw": hwc[:, :, 0]}[layout]
    out = io.BytesIO()
    np.save(out, stored)
    array, what = read_native(out.getvalue(), "npy")
    fmt = PixelFormat(1 if layout == "hw" else 4, "int16", "-100..100")
    array, note = conform(array, fmt, "x", what)
    assert note is None and np.array_equal(array, hwc if layout != "hw" else hwc[:, :, :1])


def test_inspect_reports_kinds_and_bit_depths_per_shard(tmp_path, capsys):
    files = {"a.png": png(levels16(0)), "b.png": png(np.zeros((8, 8), np.uint8)),
             "c.tif": tif(np.zeros((8, 8, 4), np.float32))}
    pattern = shard_folder(tmp_path, files)
    report = inspect_shards(pattern)
    assert report.ok and report.modes() == {"gray 16-bit": 1, "gray 8-bit": 1, "float32 x4": 1}
    assert describe_header(png(np.zeros((4, 4, 3), np.uint8)), "png") == ("RGB 8-bit", (4, 4))


def test_dicom_series_and_nifti_volumes_become_slices_with_their_values(tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("pydicom")
    volume = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 37 % 3000).astype(np.int16)
    image = nib.Nifti1Image(volume, np.eye(4))
    image.header.set_slope_inter(1, -1024)
    (tmp_path / "src" / "trainB").mkdir(parents=True)
    nib.save(image, str(tmp_path / "src" / "trainB" / "mr.nii.gz"))
    write_dicom_series(tmp_path / "src" / "trainA" / "ct", [1000, 1100, 1200])
    counts = write_slices(tmp_path / "src", tmp_path / "out", ["trainA", "trainB"], axis=0, start=1)
    assert counts == {"trainA": 2, "trainB": 3}
    # DICOM: sorted along the patient axis, RescaleIntercept applied: Hounsfield units, int16.
    ct = np.load(tmp_path / "out" / "trainA" / "ct_0001.npy")
    assert ct.dtype == np.int16 and ct.shape == (8, 7) and (ct == 1100 - 1024).all()
    mr = np.load(tmp_path / "out" / "trainB" / "mr_0002.npy")
    assert mr.dtype == np.int16 and np.array_equal(mr, volume[2] - 1024)
    # And they shard and decode like any image, at their depth.
    write_shards(tmp_path / "out", tmp_path / "shards", splits=["trainA"], shuffle_seed=None)
    fmt = PixelFormat(1, "int16", "-1024..3071")
    item = next(iter(lazy_inputs(str(tmp_path / "shards" / "trainA" / "*.tar"), fmt=fmt)))
    assert item.key == "ct_0001"
    assert np.array_equal(fmt.from_unit(item.load().values.permute(1, 2, 0).numpy())[:, :, 0], ct)


def write_dicom_series(folder, values: list[int]) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    for i, value in enumerate(reversed(values)):  # Written out of order: reading sorts them.
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 7, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        z = len(values) - 1 - i
        ds.InstanceNumber, ds.ImagePositionPatient = z + 1, [0.0, 0.0, float(z)]
        ds.PixelData = np.full((8, 7), value, np.uint16).tobytes()
        ds.save_as(str(folder / f"s{i}.dcm"), enforce_file_format=True)


# --- networks, samples, tiles, exports and evaluation for 1 and 4 channels --------------------------------------


@functools.cache
def tiny_nets(channels_a: int, channels_b: int):
    cfg = load_config([], ["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4", "loss.lambda_idt=0",
                           f"model.channels_a={channels_a}", f"model.channels_b={channels_b}"])
    torch.manual_seed(0)
    return cfg, *build_networks(cfg.model)


def test_the_identity_terms_of_a_colourisation_see_b_through_as_luminance():
    """G_ab(gray(b)) = b: B's own luminance is a gray image of domain A, and its colours the answer."""
    cfg = load_config([], ["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4", "model.channels_a=1"])
    torch.manual_seed(0)
    gens, _ = build_networks(cfg.model, fused=True)
    a, b = torch.rand(1, 1, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    out = gens(a, b, identity=True)
    luma = (b * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    with torch.no_grad():
        assert torch.allclose(out["idt_b"], gens.G_ab(luma), atol=1e-6)
        assert torch.allclose(out["idt_a"], gens.G_ba(a.expand(-1, 3, -1, -1)), atol=1e-6)
    assert out["idt_b"].shape == b.shape and out["idt_a"].shape == a.shape


@pytest.mark.parametrize("channels", [(1, 3), (4, 1)])
def test_per_domain_channels_shape_every_network(channels):
    cfg, gens, discs = tiny_nets(*channels)
    a, b = torch.rand(2, channels[0], 32, 32) * 2 - 1, torch.rand(2, channels[1], 32, 32) * 2 - 1
    assert gens.G_ab(a).shape == b.shape and gens.G_ba(b).shape == a.shape
    assert discs.D_a(a).shape[1] == discs.D_b(b).shape[1] == 1
    assert gens.G_ab.model[1].in_channels == channels[0] and discs.D_b.model[0].in_channels == channels[1]


def test_sample_grids_show_one_channel_as_gray_and_chosen_bands_as_rgb():
    cfg, gens, _ = tiny_nets(1, 4)
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 4, 32, 32) * 2 - 1
    grid = sample_grid({"AtoB": gens.G_ab, "BtoA": gens.G_ba}, a, b, bands=((), (3, 2, 1)))
    assert grid.shape == (4 * 32 + 3 * 2, 3 * 32, 3) and grid.dtype == np.uint8
    first = grid[:32, :32]
    assert (first[..., 0] == first[..., 1]).all() and (first[..., 1] == first[..., 2]).all()  # Gray.
    real_b = grid[2 * 34 : 2 * 34 + 32, :32]
    expected = ((b[0, [3, 2, 1]].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(real_b, expected)


@pytest.mark.parametrize("channels", [1, 4])
def test_tiled_translation_of_1_and_4_channel_models_equals_untiled(channels):
    cfg, gens, _ = tiny_nets(channels, channels)
    net = gens.G_ab.eval()
    x = torch.rand(1, channels, 40, 48) * 2 - 1
    with torch.no_grad():
        whole = net(x)
        tiled = TiledForward(16, torch.device("cpu"))(net, x)
    assert (tiled - whole).abs().max().item() < 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("channels", [1, 4])
def test_exports_of_1_and_4_channel_models_match_pytorch(tmp_path, fmt, channels):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    cfg, gens, _ = tiny_nets(channels, channels)
    model = PaddedGenerator(gens.G_ab.eval(), 4).eval()
    path = tmp_path / f"g.{fmt}"
    if fmt == "torchscript":
        export_torchscript(model, path, {})
    else:
        export_onnx(model, path, {}, channels=channels)
    assert check_export(model, path, fmt, [(1, 32, 32), (2, 37, 29)], channels=channels) < 1e-4


@pytest.mark.parametrize("channels,fid_key", [(1, "fid_replicated"), (4, None)])
def test_evaluation_of_1_and_4_channel_models_runs_without_cuda_and_labels_fid(tmp_path, channels, fid_key):
    from pipeline.eval.evaluate import evaluate_direction

    rng = np.random.default_rng(1)
    shape = (16, 16) if channels == 1 else (16, 16, channels)
    sources = {f"{i}.tif": tif(rng.integers(0, 65536, shape).astype(np.uint16)) for i in range(4)}
    src = shard_folder(tmp_path / "a", sources, "testA")
    dst = shard_folder(tmp_path / "b", sources, "testB")  # Its own ground truth: identity is perfect.
    fmt = PixelFormat(channels, "uint16")

    class Features(nn.Module):  # A stand-in extractor: 3 channels in, 8 features out.
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[1] == 3
            return torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3))[:, :2]], 1)

    _, gens, _ = tiny_nets(channels, channels)
    result = evaluate_direction(Identity(), gens.G_ba.eval(), 4, src, dst, torch.device("cpu"), Features(), 16,
                                paired_keys=True, formats=(fmt, fmt), kid_subset_size=2, kid_subsets=2)
    assert result["l1"] == 0 and result["l1_units"] == 0 and result["pairs"] == 4
    assert (fid_key in result) == (fid_key is not None) and "fid" not in result
    for band in range(channels):
        assert abs(result[f"band{band}_mean"] - result[f"band{band}_mean_real"]) < 1e-6
        assert 10_000 < result[f"band{band}_mean"] < 55_000  # In stored units (16-bit levels).


def test_a_reference_generator_built_with_input_nc_1_output_nc_3_loads_strictly_and_translates_alike(tmp_path):
    from support.reference_resnet import ReferenceResnetGenerator

    torch.manual_seed(3)
    reference = ReferenceResnetGenerator(1, 3, ngf=8, n_blocks=6).eval()
    path = tmp_path / "latest_net_G_A.pth"
    torch.save(reference.state_dict(), path)
    gens = load_generators(path, "AtoB", [])
    assert (gens.model.channels_a, gens.model.channels_b, gens.model.ngf) == (1, 3, 8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(gens.net(x), reference(x))
    # 11,378,179 parameters at the reference defaults for 3 -> 3; one input channel less is 2 x 64 x 7 x 7 fewer.
    full = ReferenceResnetGenerator(1, 3, ngf=64, n_blocks=9)
    assert sum(p.numel() for p in full.parameters()) == 11_378_179 - 2 * 64 * 49


def test_our_1_channel_networks_export_to_reference_shaped_files(tmp_path):
    from support.reference_resnet import ReferenceResnetGenerator

    cfg, gens, discs = tiny_nets(1, 3)
    nets = {"G_ab": gens.G_ab, "G_ba": gens.G_ba, "D_a": discs.D_a, "D_b": discs.D_b}
    export_reference(nets, tmp_path)
    for name, (source, target) in (("G_A", (1, 3)), ("G_B", (3, 1))):
        saved = torch.load(tmp_path / f"latest_net_{name}.pth", weights_only=True)
        reference = ReferenceResnetGenerator(source, target, ngf=4, n_blocks=6)
        reference.load_state_dict(saved, strict=True)
    # The reference's D_A judges B (G_A's outputs), D_B judges A.
    assert torch.load(tmp_path / "latest_net_D_B.pth", weights_only=True)["model.0.weight"].shape[1] == 1
    assert torch.load(tmp_path / "latest_net_D_A.pth", weights_only=True)["model.0.weight"].shape[1] == 3


def test_held_out_sets_and_translations_of_a_grayscale_domain_keep_one_channel(tmp_path):
    pattern = shard_folder(tmp_path, {f"{i}.png": png(np.full((20, 24), 30 * i, np.uint8)) for i in range(3)},
                           "testA")
    fmt = formats_from(load_config([], ["model.channels_a=1", "loss.lambda_idt=0"]))["A"]
    keys, batch = held_out(pattern, 2, 16, fmt)
    assert batch.shape == (2, 1, 16, 16) and len(keys) == 2
    gens = identity_gens(["model.channels_a=1", "model.channels_b=1"])
    translate_source(gens, pattern, tmp_path / "out", torch.device("cpu"))
    written = Image.open(tmp_path / "out" / "images" / "1.png")
    assert written.mode == "L" and np.asarray(written).max() == 30


def test_encoded_outputs_round_trip_losslessly_in_every_container():
    rng = np.random.default_rng(0)
    for array, ext in ((rng.integers(0, 65536, (5, 6, 3)).astype(np.uint16), "png"),
                       (rng.integers(-3000, 3000, (5, 6, 1)).astype(np.int16), "tif"),
                       (rng.random((5, 6, 7)).astype(np.float32), "npy"),
                       (rng.integers(0, 256, (5, 6, 1)).astype(np.uint8), "png")):
        back, _ = read_native(encode_native(array, ext), ext)
        assert back.dtype == array.dtype and np.array_equal(back, array), ext


def test_training_reads_a_16_bit_grayscale_pair_and_its_checkpoint_records_the_mapping(tmp_path):
    from support import dataset_scripts

    from pipeline.train.loop import run

    scanner = dataset_scripts.load("scanner")
    scanner.make_scanner(tmp_path / "images", train=8, test=4, size=32)
    write_shards(tmp_path / "images", tmp_path / "shards", maxcount=8)
    shards = {s: str(tmp_path / "shards" / s / "*.tar") for s in ("trainA", "trainB", "testA", "testB")}
    from support.runs import tiny_overrides

    overrides = tiny_overrides(shards, tmp_path / "run", **{
        "model.channels_a": 1, "model.channels_b": 1, "data.domain_a.depth": "uint16",
        "data.domain_b.depth": "uint16", "tracking.enabled": "false", "eval.paired": "true", "eval.every_steps": 6,
        "data.load_size": 32})
    result = run(load_config([], overrides))
    assert result.evaluation["AtoB/pairs"] == 4 and "AtoB/l1_units" in result.evaluation
    saved = json.loads(json.dumps(dict(load_config([tmp_path / "run" / "config.yaml"]).data.domain_a)))
    assert saved["depth"] == "uint16"
    grid = Image.open(sorted((tmp_path / "run" / "samples").glob("*.png"))[-1])
    assert grid.mode == "RGB"


def test_fastcut_trains_from_4_band_float_tiffs_to_16_bit_npy_slices(tmp_path):
    """TIFF and npy shards pass the start-up count and the streams, with a windowed float domain."""
    from support.runs import tiny_overrides

    from pipeline.train.loop import run

    rng = np.random.default_rng(0)
    shards = {}
    for split, n in (("trainA", 6), ("testA", 2)):
        shards[split] = shard_folder(tmp_path / split, {f"{i}.tif": tif(rng.random((36, 36, 4)).astype(np.float32))
                                                        for i in range(n)}, split)
    for split, n in (("trainB", 6), ("testB", 2)):
        files = {}
        for i in range(n):
            out = io.BytesIO()
            np.save(out, rng.integers(0, 65536, (36, 36)).astype(np.uint16))
            files[f"{i}.npy"] = out.getvalue()
        shards[split] = shard_folder(tmp_path / split, files, split)
    overrides = tiny_overrides(shards, tmp_path / "run", **{
        "model.method": "fastcut", "model.channels_a": 4, "model.channels_b": 1, "data.domain_a.depth": "float32",
        "data.domain_a.intensity": "0..1", "data.domain_a.bands": "3,2,1", "data.domain_b.depth": "uint16",
        "tracking.enabled": "false", "train.steps": 4, "checkpoint.every_steps": 4, "report.sample_every_steps": 2})
    result = run(load_config([], overrides))
    assert result.step == 4 and (tmp_path / "run" / "ckpt-000000004").exists()


def test_the_shard_writer_stores_wide_and_native_members_unchanged_and_refuses_to_re_encode_them(tmp_path):
    data = png(levels16(0))
    folder = tmp_path / "images" / "trainA"
    folder.mkdir(parents=True)
    (folder / "deep.png").write_bytes(data)
    write_shards(tmp_path / "images", tmp_path / "shards", splits=["trainA"])
    with tarfile.open(next((tmp_path / "shards" / "trainA").glob("*.tar"))) as tar:
        stored = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".png"))).read()
    assert stored == data
    manifest = write_shards(tmp_path / "images", tmp_path / "resized", splits=["trainA"], resize=16)
    assert manifest["skipped"] and "re-encode as 8-bit RGB" in str(manifest["skipped"][0])


def test_float_augmentation_draws_the_crop_and_flip_the_8_bit_path_draws():
    x = torch.linspace(-1, 1, 3 * 40 * 40).reshape(3, 40, 40)
    augment = Augment("crop", 40, 32, flip=True)
    array = ((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    for seed in range(6):
        via_pil = augment(Image.fromarray(array), random.Random(seed)).float().div(127.5).sub(1)
        via_float = augment.tensor(((torch.from_numpy(array).permute(2, 0, 1).float() / 127.5) - 1),
                                   random.Random(seed))
        assert torch.allclose(via_pil, via_float, atol=1e-6)
