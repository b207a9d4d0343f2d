"""model/pixels.py: the single decoder. Datasets are built in the test, nothing is downloaded."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.model.codestream import PixelDecodeError, check_pixel_budget, read_codestream_info
from osteogate.model.pixels import dataset_to_image, load_image_file, reduction_steps
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_dicom"


def ramp(rows: int = 64, cols: int = 48, bits: int = 12) -> np.ndarray:
    """Deterministic 12-bit texture: gradient + noise, so min/max and percentiles are not trivial."""
    rng = np.random.default_rng(1)
    base = np.linspace(0, 1, rows * cols).reshape(rows, cols)
    values = base * (2**bits - 200) + rng.integers(0, 200, (rows, cols))
    return values.astype(np.uint16)


def make_ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def test_monochrome2_in_unit_range_and_bright_is_bright():
    pixels = ramp()
    image = dataset_to_image(make_ds(pixels))
    assert image.dtype == np.float32 and image.shape == pixels.shape
    assert image.min() >= 0.0 and image.max() <= 1.0
    # Robust min-max: about 0.5 % of pixels clip at each end, the rest spans the range.
    assert image.max() == 1.0 and image.min() == 0.0
    assert np.corrcoef(image.ravel(), pixels.ravel())[0, 1] > 0.99


def test_monochrome1_is_inverted():
    pixels = ramp()
    mono2 = dataset_to_image(make_ds(pixels, "MONOCHROME2"))
    mono1 = dataset_to_image(make_ds(pixels, "MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_window_changes_output_and_follows_dicom_formula():
    pixels = ramp()
    plain = dataset_to_image(make_ds(pixels))
    ds = make_ds(pixels)
    ds.WindowCenter, ds.WindowWidth = 1000, 801
    windowed = dataset_to_image(ds)
    assert not np.allclose(plain, windowed, atol=0.05)
    expected = np.clip((pixels.astype(np.float64) - 999.5) / 800 + 0.5, 0, 1)
    np.testing.assert_allclose(windowed, expected, atol=1e-5)


def test_window_is_applied_after_modality_lut():
    pixels = ramp()
    ds = make_ds(pixels)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    ds.WindowCenter, ds.WindowWidth = 1000, 2001
    expected = np.clip((pixels * 2.0 - 1000 - 999.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(dataset_to_image(ds), expected, atol=1e-5)


def test_voi_lut_sequence_is_used():
    pixels = (ramp() // 16).astype(np.uint16)  # 8-bit range so a 256-entry LUT covers it
    ds = make_ds(pixels, bits_stored=8)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.LUTData = [255 - i for i in range(256)]  # inverting LUT: obviously different from min-max
    ds.VOILUTSequence = Sequence([lut])
    image = dataset_to_image(ds)
    np.testing.assert_allclose(image, (255 - pixels) / 255.0, atol=1e-6)


def test_first_frame_of_multiframe():
    first, second = ramp(), ramp()[::-1].copy()
    image = dataset_to_image(make_ds(np.stack([first, second])))
    np.testing.assert_allclose(image, dataset_to_image(make_ds(first)), atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_decodes_like_uncompressed(syntax):
    pixels = ramp()
    reference = dataset_to_image(make_ds(pixels))
    ds = make_ds(pixels)
    ds.compress(syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_allclose(dataset_to_image(ds), reference, atol=1e-6)


def test_rgb_becomes_grayscale():
    ds = make_ds(ramp())
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red -> BT.601 luma 0.299
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 8, 8, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    image = dataset_to_image(ds)
    assert image.shape == (8, 8)
    np.testing.assert_allclose(image, 0.299, atol=1e-4)


def test_missing_pixel_data_raises():
    ds = make_ds(ramp())
    del ds.PixelData
    with pytest.raises(PixelDecodeError, match="PixelData"):
        dataset_to_image(ds)


def test_absurd_size_raises():
    ds = make_ds(ramp())
    ds.Rows = 60000
    with pytest.raises(PixelDecodeError, match="absurd"):
        dataset_to_image(ds)


def test_unsupported_transfer_syntax_raises():
    ds = make_ds(ramp())
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    with pytest.raises(PixelDecodeError, match="transfer syntax|decoder"):
        dataset_to_image(ds)


def test_truncated_pixel_data_raises():
    ds = make_ds(ramp())
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDecodeError):
        dataset_to_image(ds)


def test_load_image_file_png_8_and_16_bit(tmp_path):
    gray = (np.arange(64 * 32).reshape(64, 32) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "a.png")
    np.testing.assert_allclose(load_image_file(tmp_path / "a.png"), gray / 255.0, atol=1e-6)
    deep = (np.arange(64 * 32).reshape(64, 32) * 31).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "b.png")
    np.testing.assert_allclose(load_image_file(tmp_path / "b.png"), deep / 65535.0, atol=1e-6)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "c.jpg", quality=95)
    assert np.abs(load_image_file(tmp_path / "c.jpg") - gray / 255.0).mean() < 0.03


def test_load_image_file_detects_dicom_without_suffix(tmp_path):
    ds = make_ds(ramp())
    target = tmp_path / "image_without_suffix"
    ds.save_as(target, enforce_file_format=True)
    np.testing.assert_allclose(load_image_file(target), dataset_to_image(ds), atol=1e-6)


def test_load_image_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_file(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(PixelDecodeError):
        load_image_file(tmp_path / "junk.png")


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="sample_dicom/ not present")
def test_sample_files_decode():
    for path in sorted(SAMPLES.glob("*.dcm")):
        image = load_image_file(path)
        assert image.ndim == 2 and image.dtype == np.float32
        assert 0.0 <= image.min() < image.max() <= 1.0, path.name


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk not installed")
@pytest.mark.parametrize(("option", "bits", "atol"), [("+eb", 8, 0.08), ("+el", 12, 1e-6)])
def test_jpeg_baseline_and_lossless_via_dcmtk(tmp_path, option, bits, atol):
    pixels = ramp(bits=bits)
    if bits == 8:
        pixels = np.clip(pixels, 0, 255)
    ds = make_ds(pixels, bits_stored=bits)
    if bits == 8:
        ds.BitsAllocated = 8
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    source, target = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds.save_as(source, enforce_file_format=True)
    subprocess.run(["dcmcjpeg", option, str(source), str(target)], check=True, timeout=30, capture_output=True)
    compressed = pydicom.dcmread(target)
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    difference = np.abs(dataset_to_image(compressed) - dataset_to_image(ds))
    assert difference.mean() <= atol / 4 and difference.max() <= max(atol, 1e-6) * (4 if bits == 8 else 1)


# -- codestream headers and the decoded-pixel budget (no decoding involved) ---------------------------


def _compressed(syntax, rows: int = 64, cols: int = 48) -> Dataset:
    ds = make_ds(ramp(rows, cols))
    ds.compress(syntax)
    return ds


@pytest.mark.parametrize(("syntax", "kind"), [(JPEG2000Lossless, "jpeg2000"), (JPEGLSLossless, "jpeg-ls"),
                                              (RLELossless, "rle")])
def test_codestream_header_read_from_real_streams(syntax, kind):
    ds = _compressed(syntax)
    info = check_pixel_budget(ds)
    assert info is not None and info.kind == kind
    if kind == "rle":
        assert (info.rows, info.columns, info.components, info.precision) == (None, None, 1, 16)
    else:
        assert (info.rows, info.columns, info.components) == (64, 48, 1)
        assert info.precision in (12, 16)
    if kind == "jpeg2000":
        assert info.levels >= 1 and info.reversible


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk not installed")
@pytest.mark.parametrize(("option", "process", "precision"),
                         [("+eb", "baseline", 8), ("+ee", "extended", 12), ("+e1", "lossless", 12)])
def test_jpeg_sof_read(tmp_path, option, process, precision):
    pixels = ramp()
    ds = make_ds(pixels if precision > 8 else (pixels >> 4), bits_stored=precision)
    if precision == 8:
        ds.BitsAllocated = 8
        ds.PixelData = (pixels >> 4).astype(np.uint8).tobytes()
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    subprocess.run(["dcmcjpeg", option, str(tmp_path / "in.dcm"), str(tmp_path / "out.dcm")], check=True,
                   capture_output=True, timeout=30)
    info = check_pixel_budget(pydicom.dcmread(tmp_path / "out.dcm"))
    assert info is not None and (info.kind, info.rows, info.columns, info.process) == ("jpeg", 64, 48, process)
    assert info.precision == precision or (process == "lossless" and info.precision == 16)  # dcmcjpeg: 16


def test_native_pixels_are_checked_against_the_budget_only():
    assert check_pixel_budget(make_ds(ramp())) is None
    ds = make_ds(ramp())
    ds.Rows, ds.Columns = 8000, 8000  # 64 Mpx > 32 Mpx budget
    with pytest.raises(PixelDecodeError, match="decoded-pixel budget"):
        check_pixel_budget(ds)


@pytest.mark.parametrize("name", ["JPEG SOF", "JPEG-LS SOF55", "JPEG 2000 SIZ", "RLE segments"])
def test_dimension_bombs_refused_before_decoding(name):
    import time

    from tests.helpers.bombs import BOMBS

    if name == "JPEG SOF" and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk not installed")
    bomb = BOMBS[name]()
    assert (bomb.Rows, bomb.Columns) == (64, 64)
    t0 = time.perf_counter()
    with pytest.raises(PixelDecodeError) as info:
        check_pixel_budget(bomb)
    with pytest.raises(PixelDecodeError):
        dataset_to_image(bomb, 1024)  # the decode path checks first
    assert time.perf_counter() - t0 < 2
    message = str(info.value)
    assert name.split()[0] in message
    if name != "RLE segments":
        assert "30000x30000" in message and "64x64" in message, message
    else:
        assert "3 components but SamplesPerPixel is 1" in message, message


def test_consistent_but_over_budget_codestream_is_refused():
    from tests.helpers.bombs import j2k_bomb

    bomb = j2k_bomb(8000, 8000)
    bomb.Rows = bomb.Columns = 8000  # header and SIZ agree, but 64 Mpx is over the budget
    with pytest.raises(PixelDecodeError, match="exceeds the decoded-pixel budget"):
        check_pixel_budget(bomb)


def test_corrupt_codestream_headers():
    ds = _compressed(JPEG2000Lossless)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    with pytest.raises(PixelDecodeError, match="SOC"):
        read_codestream_info(JPEG2000Lossless, b"\x00" * 100)
    with pytest.raises(PixelDecodeError, match="SOC"):
        read_codestream_info(JPEG2000Lossless, frame[:20])  # truncated SIZ
    with pytest.raises(PixelDecodeError, match="SOI"):
        read_codestream_info(JPEGLSLossless, b"\x00\x00\xff\xf7")
    with pytest.raises(PixelDecodeError, match="no frame header"):
        read_codestream_info(JPEGLSLossless, b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 10)
    with pytest.raises(PixelDecodeError, match="DNL"):  # height 0: defined later by a DNL marker
        read_codestream_info(pydicom.uid.JPEGBaseline8Bit, b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x00\x40\x01\x01\x11\x00")
    with pytest.raises(PixelDecodeError, match="RLE"):
        read_codestream_info(RLELossless, b"\x01\x00\x00\x00" + b"\x00" * 20, 16)
    with pytest.raises(PixelDecodeError, match="segments"):
        read_codestream_info(RLELossless, struct.pack("<16I", 0, *([0] * 15)), 16)
    ds.PixelData = b"\xfe\xff\x00\xe0\x10\x00\x00\x00garbage"  # malformed item table
    # the item layout check (model/fragments.py) names the broken table before pydicom is asked
    with pytest.raises(PixelDecodeError, match="encapsulated pixel data malformed|Basic Offset Table length"):
        check_pixel_budget(ds)


def test_jp2_wrapped_codestream_is_read():
    ds = _compressed(JPEG2000Lossless)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    jp2 = (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4s", 20, b"ftyp") + b"jp2 \x00\x00\x00\x00jp2 "
           + struct.pack(">I4s", 8 + len(frame), b"jp2c") + frame)
    info = read_codestream_info(JPEG2000Lossless, jp2)
    assert info is not None and (info.rows, info.columns) == (64, 48)


def test_reduction_steps_never_enlarge():
    assert reduction_steps(2048, 1024, 5) == 1
    assert reduction_steps(2047, 1024, 5) == 1  # ceil(2047 / 2) = 1024, as OpenJPEG and libjpeg round
    assert reduction_steps(2046, 1024, 5) == 0
    assert reduction_steps(4096, 1024, 5) == 2
    assert reduction_steps(4096, 1024, 1) == 1  # capped by the codestream's levels
    assert reduction_steps(2048, 224, 5) == 3
    assert reduction_steps(1000, 1024, 5) == 0


def test_header_beyond_the_head_or_in_split_fragments_still_read():
    """check_pixel_budget reads only the frame's first 64 KB where it can (no copy of the frame);
    a main header further in (a big APP/COM segment) or a frame split into fragments is parsed from
    the whole frame instead, and a bomb hidden that way is still found."""
    from pydicom.encaps import encapsulate

    from tests.helpers.bombs import patch_jpeg_sof

    ds = _compressed(JPEGLSLossless)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    comment = b"\xff\xfe" + struct.pack(">H", 65535) + b"x" * 65533  # a 64 KB COM segment after SOI
    padded = frame[:2] + comment + comment + frame[2:]
    ds.PixelData = encapsulate([padded])
    assert (check_pixel_budget(ds).rows, check_pixel_budget(ds).columns) == (64, 48)
    ds.PixelData = encapsulate([patch_jpeg_sof(padded, 30000, 30000, {0xF7})])
    with pytest.raises(PixelDecodeError, match="30000x30000"):
        check_pixel_budget(ds)
    ds.PixelData = encapsulate([patch_jpeg_sof(frame, 30000, 30000, {0xF7})], fragments_per_frame=3)
    with pytest.raises(PixelDecodeError, match="30000x30000"):
        check_pixel_budget(ds)
