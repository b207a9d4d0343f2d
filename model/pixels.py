"""The ONE pixel decoder used by serving and training: DICOM / PNG / JPEG -> float32 HxW in [0, 1].

Training and serving must see identical pixels, otherwise the model is evaluated on a different input
distribution than it was trained on. Pipeline for DICOM:

1. decode the first frame only (pydicom + pylibjpeg/pyjpegls plugins; multi-frame files are rare for
   radiographs and the first frame is the acquired image);
2. colour (RGB/YBR/PALETTE COLOR) -> luminance, scaled by the stored bit depth;
3. grayscale: Modality LUT (rescale slope/intercept or LUT), then the VOI chosen by the sender
   (VOI LUT sequence, else the first window), mapped to [0, 1]; without VOI, a robust min-max between
   the 0.5th and 99.5th percentiles so a few hot/cold pixels (markers, collimator edges) do not squash
   the contrast;
4. MONOCHROME1 is inverted so bone is always bright;
5. with ``long_side`` (the model's working size, ``model.preprocess.needed_long_side``): resized so
   the long side is ``long_side`` (never enlarged).

Decode only what the model needs: when ``long_side`` is given and the first frame is JPEG 2000
(any of its transfer syntaxes) or 8-bit JPEG baseline/extended, monochrome, the codestream is
decoded directly at the smallest power-of-two reduction (down to 1/4) whose long side is still
>= ``long_side`` (JPEG 2000 resolution levels through Pillow's OpenJPEG ``reduce``, then a 3-tap
filter that makes the wavelet low-pass match a box average; libjpeg DCT scaling through Pillow
``draft``), then steps 3-5 run on the reduced image. Everything else (native, RLE, JPEG lossless,
JPEG-LS, 12-bit JPEG, colour) is decoded at full size. Steps 3-4 act on values, so they commute
with downscaling only approximately (clipping at the window edges, non-linear LUTs): the
difference from "decode full, then resize" is measured per transfer syntax in
tests/test_decode_parity.py (tolerance stated there, ``PARITY_*``) and benchmarks/decode.py.
Without VOI, the robust min-max percentiles are taken on the image at ``long_side`` (after the
resize), so they do not depend on how it was decoded.

Before anything is decoded, the codestream's OWN header is checked against the dataset's header and
the decoded-pixel budget (model/codestream.py, ``check_pixel_budget``): a 64x64 header over a
30000x30000 codestream is refused in microseconds, not decoded for 24 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from osteogate.model.codestream import (
    MAX_DECODED_PIXELS,
    RLE_SYNTAX_UID,
    PixelDecodeError,
    check_pixel_budget,
    checked_first_frame,
    read_codestream_info,
)
from osteogate.model.codestream import transfer_syntax as _transfer_syntax
from osteogate.model.preprocess import resize_long_side
from osteogate.model.reduced import decode_reduced, reduction_steps
from pydicom.dataset import Dataset

# Re-exported: callers that decode also check codestreams (model/codestream.py owns them).
__all__ = ["MAX_DECODED_PIXELS", "PixelDecodeError", "check_pixel_budget", "dataset_to_image", "load_image_file",
           "is_decoder_panic", "read_codestream_info", "reduction_steps"]

MAX_SIDE = 16384  # radiographs are at most ~4-5k px; anything bigger is corrupt or not an image
# Full-size decoders tried first where pydicom's default is slower. JPEG-LS and RLE decoding is
# exactly defined, so the pixels are the same whichever plugin decodes: CharLS (pyjpegls) decodes a
# 2048x2048 JPEG-LS image ~3x faster than libjpeg (benchmarks/decode.py). Empty it to measure
# pydicom's default choice (the path before issue #11).
PREFERRED_PLUGINS: dict[str, str] = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls",
                                     RLE_SYNTAX_UID: "pylibjpeg"}
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
_PERCENTILE_SAMPLES = 1_000_000  # subsample big images for the percentiles: same result, 4x faster


def _check_geometry(ds: Dataset) -> None:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise PixelDecodeError("Rows/Columns missing or zero")
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise PixelDecodeError(f"absurd image size {rows}x{columns}")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3):
        raise PixelDecodeError(f"unsupported SamplesPerPixel {samples}")
    if int(ds.get("BitsAllocated", 0) or 0) not in (1, 8, 16, 32):
        raise PixelDecodeError(f"unsupported BitsAllocated {ds.get('BitsAllocated')!r}")


# -- decoding ---------------------------------------------------------------------------------------


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    syntax = _transfer_syntax(ds)
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as exc:
        raise PixelDecodeError(f"unsupported transfer syntax {syntax} ({syntax.name})") from exc
    if not decoder.is_available:
        raise PixelDecodeError(f"no decoder plugin installed for {syntax.name}")
    preferred = PREFERRED_PLUGINS.get(str(syntax))
    if preferred in decoder.available_plugins:
        try:  # the faster plugin first; any failure falls through to pydicom's own choice
            return decoder.as_array(ds, index=0, as_rgb=True, transfer_syntax_uid=syntax, decoding_plugin=preferred)[0]
        except Exception:
            pass
        except BaseException as exc:  # a Rust plugin's panic (pyo3 PanicException) is a BaseException
            if not is_decoder_panic(exc):
                raise
    try:
        # index=0 decodes one frame only: a 100-frame file costs one frame of memory.
        # as_rgb converts YBR colour to RGB so the luminance formula below holds.
        array, _ = decoder.as_array(ds, index=0, as_rgb=True, transfer_syntax_uid=syntax)
    except Exception as exc:  # plugins raise anything from ValueError to RuntimeError on corrupt data
        raise PixelDecodeError(f"cannot decode pixel data ({syntax.name}): {type(exc).__name__}: {exc}") from exc
    except BaseException as exc:
        if not is_decoder_panic(exc):
            raise
        raise PixelDecodeError(f"cannot decode pixel data ({syntax.name}): decoder failed: {exc}") from exc
    return array


def is_decoder_panic(exc: BaseException) -> bool:
    """True for a decoder plugin's panic: pylibjpeg-rle (Rust, pyo3) raises PanicException, a
    BaseException, on RLE segments longer than Rows x Columns. Such data is the sender's fault;
    interrupts and exits are not.

    Parameters
    ----------
    exc : BaseException
        What a decoder raised.

    Returns
    -------
    bool
        True when it is a decoder's panic (to be treated as undecodable data).
    """
    return not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _colour_to_gray(array: np.ndarray, ds: Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        try:
            array = pydicom.pixels.apply_color_lut(array, ds)
        except Exception as exc:
            raise PixelDecodeError(f"cannot apply palette colour LUT: {exc}") from exc
        max_value = float(2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
    else:
        max_value = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    rgb = array.astype(np.float32, copy=False)
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R BT.601 luma
    return np.clip(gray / max_value, 0.0, 1.0)


def _modality(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT. Linear rescale is done in float32 in place (pydicom would allocate float64:
    32 MB extra for a 2k x 2k image); a Modality LUT Sequence goes through pydicom."""
    if "ModalityLUTSequence" in ds:
        try:
            return pydicom.pixels.apply_modality_lut(array, ds).astype(np.float32, copy=False)
        except Exception as exc:
            raise PixelDecodeError(f"cannot apply Modality LUT: {exc}") from exc
    values = array.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, written directly to the [0, 1] output range."""
    center = float(np.atleast_1d(ds.WindowCenter)[0])
    width = float(np.atleast_1d(ds.WindowWidth)[0])
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise PixelDecodeError(f"invalid WindowWidth {width}")
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    # In place on ``values`` (owned by the caller, discarded after): no full-size temporaries.
    if function == "LINEAR_EXACT":
        offset, scale = center - 0.5 * width, width
    else:
        offset, scale = center - 0.5 - 0.5 * (width - 1.0), width - 1.0
    values -= np.float32(offset)
    values /= np.float32(scale)
    return np.clip(values, 0.0, 1.0, out=values)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    try:
        # LUT lookup needs integer input: modality values are integral for any real LUT use.
        out = pydicom.pixels.apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float32, copy=False)
    except Exception as exc:
        raise PixelDecodeError(f"cannot apply VOI LUT: {exc}") from exc
    # The output range is that of the LUT data (its descriptor's bit depth is unreliable in the wild).
    lut = np.frombuffer(item.LUTData, dtype=np.uint8 if int(item.LUTDescriptor[2]) <= 8 else np.uint16) \
        if isinstance(item.LUTData, bytes) else np.asarray(item.LUTData)
    low, high = float(np.min(lut)), float(np.max(lut))
    return np.clip((out - low) / max(high - low, 1e-6), 0.0, 1.0)


def _robust_minmax(values: np.ndarray) -> np.ndarray:
    sample = values.ravel()
    if sample.size > _PERCENTILE_SAMPLES:
        sample = sample[:: sample.size // _PERCENTILE_SAMPLES + 1]
    low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:  # flat image: keep it flat (all zeros) rather than divide by zero
        return np.zeros_like(values, dtype=np.float32)
    out = values - np.float32(low)
    out /= np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def dataset_to_image(ds: Dataset, long_side: int | None = None, *, reduced: bool = True) -> np.ndarray:
    """Decode a DICOM dataset to a float32 2-D array in [0, 1], bone bright (see module docstring).

    ``long_side``: the long side the model needs (``model.preprocess.needed_long_side(card.input)``);
    the image is returned with that long side (smaller images as they are) and, where the codestream
    allows it, decoded at reduced resolution. ``reduced=False`` forces the full-size decode (the
    reference the parity tests and benchmarks compare with). ``long_side=None``: full resolution.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The instance, with its pixel data.
    long_side : int or None
        The long side wanted, or None for full resolution.
    reduced : bool
        Allow the reduced-resolution decode.

    Returns
    -------
    numpy.ndarray
        float32 2-D image in [0, 1], bone bright.

    Raises
    ------
    PixelDecodeError
        When the pixels cannot or must not be decoded (the reason is the message).
    """
    if "PixelData" not in ds:
        kind = "float/double pixel data" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no PixelData"
        raise PixelDecodeError(f"{kind}: not a decodable radiograph")
    _check_geometry(ds)
    info, frame = checked_first_frame(ds)  # before any decoding: codestream bombs stop here
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    array = None
    if (reduced and long_side and info is not None and frame is not None
            and photometric in ("MONOCHROME1", "MONOCHROME2")):
        array = decode_reduced(ds, info, frame, long_side)
    del frame
    if array is None:
        array = _decode_first_frame(ds)
    if samples == 3 or photometric == "PALETTE COLOR":
        image = _colour_to_gray(array, ds)
    else:
        if array.ndim != 2:
            raise PixelDecodeError(f"unexpected decoded shape {array.shape}")
        values = _modality(array, ds)
        del array
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
            image = _voi_lut(values, ds)
        elif _has_window(ds):
            image = _window(values, ds)
        else:
            # Percentiles are taken at the size the model sees: a 2x2 average has less noise than
            # the full image, so percentiles of the full image would depend on how it was decoded.
            if long_side and max(values.shape) > long_side:
                values = resize_long_side(values, long_side)
            image = _robust_minmax(values)
        if photometric == "MONOCHROME1":
            np.subtract(1.0, image, out=image)
    if long_side and max(image.shape) > long_side:
        image = resize_long_side(image, long_side)  # the same resize serving's prepare() would do
    image = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise PixelDecodeError("decoded image contains NaN/inf")
    return image


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _load_raster(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # phone photos of films carry EXIF rotation
            if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                values = np.asarray(image, dtype=np.float32)
                # 16-bit PNGs come back as mode "I": scale by the 16-bit range, like the 8-bit path.
                return np.clip(values / 65535.0, 0.0, 1.0)
            if image.mode == "F":
                return _robust_minmax(np.asarray(image, dtype=np.float32))
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise PixelDecodeError(f"{path.name}: cannot read image: {exc}") from exc


def load_image_file(path: Path | str, long_side: int | None = None) -> np.ndarray:
    """PNG/JPEG (Pillow, grayscale) or DICOM (preamble 'DICM' or .dcm suffix) -> float32 HxW in [0, 1].

    ``long_side`` as in ``dataset_to_image`` (training passes the working size, so it sees the
    pixels serving sees). PNG/JPEG files are decoded at full size, then resized: they are training
    material, and keeping their decode unchanged keeps the training distribution unchanged.

    Parameters
    ----------
    path : pathlib.Path or str
        The file.
    long_side : int or None
        As in :func:`dataset_to_image`.

    Returns
    -------
    numpy.ndarray
        float32 2-D image in [0, 1].

    Raises
    ------
    PixelDecodeError
        When the file cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if _is_dicom_file(path):
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise PixelDecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc
        return dataset_to_image(ds, long_side)
    image = _load_raster(path)
    if long_side and max(image.shape) > long_side:
        image = resize_long_side(image, long_side)
    return np.ascontiguousarray(image, dtype=np.float32)
