"""model/pixels.py: the single decoder. Datasets are built in the test, nothing is downloaded."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.model.pixels import PixelDecodeError, dataset_to_image, load_image_file
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
