"""Large test radiographs in every transfer syntax the gateway decodes, made from the shipped samples.

Used by tests/test_decode_parity.py and benchmarks/decode.py. The samples are 512 px; the model works
at 1024 px, so a sample is enlarged (bicubic) to the wanted size and given seeded noise (radiographs
at 2-4k px carry quantum noise and fine texture: an enlarged, noise-free image would make every
downscaling method agree trivially). Encoders: pydicom (RLE, JPEG-LS, JPEG 2000) and dcmtk
(dcmcjpeg for the JPEG processes pydicom cannot encode). Nothing is added to sample_dicom/.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from .datasets import sample_file

# name -> (transfer syntax, encoder). "8-bit": the source is reduced to 8 bits first (baseline JPEG).
SYNTAXES: dict[str, tuple[str, str]] = {
    "explicit LE": (ExplicitVRLittleEndian, "none"),
    "RLE lossless": (RLELossless, "pydicom"),
    "JPEG baseline 8-bit": (JPEGBaseline8Bit, "dcmcjpeg +eb"),
    "JPEG extended 12-bit": (JPEGExtended12Bit, "dcmcjpeg +ee"),
    "JPEG lossless SV1": (JPEGLosslessSV1, "dcmcjpeg +e1"),
    "JPEG-LS lossless": (JPEGLSLossless, "pydicom"),
    "JPEG 2000 lossless": (JPEG2000Lossless, "pydicom"),
    "JPEG 2000 lossy": (JPEG2000, "pydicom"),
}
# Decoded at reduced resolution by model.pixels (the others take the full-size path).
REDUCED = ("JPEG baseline 8-bit", "JPEG 2000 lossless", "JPEG 2000 lossy")


def enlarged_sample(name: str = "knee_dx", size: tuple[int, int] = (2048, 2048), noise: float = 25.0,
                    seed: int = 0) -> Dataset:
    """The sample's header with its 12-bit pixels enlarged to ``size`` (rows, columns) plus Gaussian
    noise of ``noise`` (in 12-bit units), explicit VR little endian."""
    ds = pydicom.dcmread(sample_file(name))
    stored = (1 << int(ds.BitsStored)) - 1
    pixels = ds.pixel_array.astype(np.float32)
    rows, columns = size
    big = cv2.resize(pixels, (columns, rows), interpolation=cv2.INTER_CUBIC)
    big += np.random.default_rng(seed).normal(0.0, noise, big.shape).astype(np.float32)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = np.clip(np.rint(big), 0, stored).astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def to_8bit(ds: Dataset) -> Dataset:
    """Same image with 8 bits stored (what baseline JPEG carries); window scaled alike."""
    out = copy.deepcopy(ds)  # Dataset.copy() is shallow: setting a value would change `ds` too
    shift = int(ds.BitsStored) - 8
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            setattr(out, keyword, max(1.0, float(ds[keyword].value) / 2**shift))
    out.BitsAllocated, out.BitsStored, out.HighBit = 8, 8, 7
    out.PixelData = (ds.pixel_array >> shift).astype(np.uint8).tobytes()
    return out


def encoder_available(name: str) -> bool:
    encoder = SYNTAXES[name][1]
    return not encoder.startswith("dcmcjpeg") or shutil.which("dcmcjpeg") is not None


def encode(ds: Dataset, name: str, work: Path) -> Path:
    """Write ``ds`` in the transfer syntax ``name`` (a SYNTAXES key) under ``work``; returns the file."""
    syntax, encoder = SYNTAXES[name]
    work.mkdir(parents=True, exist_ok=True)
    stem = name.replace(" ", "_")
    source = ds if not name.startswith("JPEG baseline") else to_8bit(ds)
    native = work / f"{stem}.native.dcm"
    source.save_as(native, enforce_file_format=True)
    target = work / f"{stem}.dcm"
    if encoder == "none":
        native.replace(target)
        return target
    if encoder == "pydicom":
        encoded = pydicom.dcmread(native)
        # 20:1 for lossy JPEG 2000: a typical PACS archive setting for radiographs.
        encoded.compress(syntax, **({"j2k_cr": [20]} if syntax == JPEG2000 else {}))
        encoded.save_as(target, enforce_file_format=True)
    else:
        subprocess.run(encoder.split() + [str(native), str(target)], check=True, capture_output=True, timeout=120)
    native.unlink()
    written = pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if written != syntax:
        raise RuntimeError(f"{encoder} wrote {written}, expected {syntax}")
    return target
