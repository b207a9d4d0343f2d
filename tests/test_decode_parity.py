"""Reduced-resolution decode (model.pixels, ``long_side``) against "decode full, then resize".

Stated tolerance, on the model input (the [0, 1] image at the model's long side, which
model.preprocess cuts into patches or letterboxes unchanged), per transfer syntax:

* native, RLE, JPEG lossless, JPEG-LS: decoded at full size, then resized: IDENTICAL to the native
  file; 12-bit JPEG also takes the full-size path.
* JPEG 2000 (lossless 5/3 and lossy 9/7: reduced resolution level + box-matching filter) and 8-bit
  JPEG baseline (libjpeg DCT scaling), reduced by 2x or 4x: mean |difference| <= PARITY_MEAN,
  99.9th percentile <= PARITY_P999 (PARITY_P999_WHOLE for the 224 px whole-image input), max <=
  PARITY_MAX (reached only at sharp high-contrast edges such as collimator borders), under a VOI
  window, without VOI (robust min-max), with MONOCHROME1 + a Modality rescale and with a non-linear
  VOI LUT (the LUT/window acts on values, so it commutes with downscaling only approximately:
  that is most of the difference); and the shipped classifier's probabilities change by
  < PARITY_PROBABILITY for every class.

Inputs are the shipped samples enlarged to 2048x2048, 2500x2000 and 4096x3328 with seeded noise
(tests/helpers/codecs.py), encoded with pydicom and dcmtk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.model.pixels import dataset_to_image
from osteogate.model.preprocess import needed_long_side, prepare
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.helpers.codecs import REDUCED, SYNTAXES, encode, encoder_available, enlarged_sample

PARITY_MEAN = 0.006
PARITY_P999 = 0.05
PARITY_P999_WHOLE = 0.10
PARITY_MAX = 0.15
PARITY_PROBABILITY = 0.01

SHIPPED = Path(__file__).resolve().parents[1] / "model" / "shipped" / "osteogate-knee.safetensors"


def with_header(ds: Dataset, variant: str) -> Dataset:
    """The same pixels under another value pipeline (the header decides Modality LUT and VOI)."""
    if variant == "window":
        return ds
    if variant == "no VOI":  # robust min-max between percentiles
        del ds.WindowCenter, ds.WindowWidth
    elif variant == "MONOCHROME1 + rescale":
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.RescaleSlope, ds.RescaleIntercept = 2, -100
        ds.WindowCenter = float(ds.WindowCenter) * 2 - 100
        ds.WindowWidth = float(ds.WindowWidth) * 2
    elif variant == "VOI LUT":  # non-linear (gamma 0.6) LUT over the stored range
        del ds.WindowCenter, ds.WindowWidth
        entries = 1 << int(ds.BitsStored)
        item = Dataset()
        item.LUTDescriptor = [entries if entries < 65536 else 0, 0, 16]
        item.LUTData = np.rint(65535 * np.linspace(0, 1, entries) ** 0.6).astype(np.uint16).tolist()
        ds.VOILUTSequence = Sequence([item])
    else:
        raise ValueError(variant)
    return ds


@dataclass
class Parity:
    reference: np.ndarray  # decode full, then resize (today's serving path)
    reduced: np.ndarray  # dataset_to_image(ds, long_side)

    @property
    def difference(self) -> np.ndarray:
        return np.abs(self.reference - self.reduced)


def parity(path: Path, variant: str, long_side: int) -> Parity:
    reference = dataset_to_image(with_header(pydicom.dcmread(path), variant), long_side, reduced=False)
    reduced = dataset_to_image(with_header(pydicom.dcmread(path), variant), long_side)
    return Parity(reference, reduced)


def check(result: Parity, what: str, p999: float = PARITY_P999) -> None:
    difference = result.difference
    summary = (f"{what}: mean {difference.mean():.5f}, p99.9 {np.quantile(difference, 0.999):.4f}, "
               f"max {difference.max():.4f}")
    print(summary)
    assert result.reduced.shape == result.reference.shape, summary
    assert difference.mean() <= PARITY_MEAN, summary
    assert np.quantile(difference, 0.999) <= p999, summary
    assert difference.max() <= PARITY_MAX, summary


def probability_change(classifier, result: Parity) -> float:
    before, after = classifier.predict([result.reference, result.reduced], ["knee", "knee"])
    return max(abs(before.probabilities[c] - after.probabilities[c]) for c in before.probabilities)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(source, syntax name) -> file; sources: a square 2048 knee, a 2500x2000 and a 4096x3328
    MONOCHROME1 knee."""
    work = tmp_path_factory.mktemp("parity")
    files = {}
    square = enlarged_sample("knee_dx", (2048, 2048), seed=1)
    for name in SYNTAXES:
        if encoder_available(name):
            files[("2048x2048", name)] = encode(square, name, work / "square")
    oblong = enlarged_sample("knee_mono1", (2500, 2000), seed=2)
    for name in REDUCED:
        if encoder_available(name):
            files[("2500x2000", name)] = encode(oblong, name, work / "oblong")
    large = enlarged_sample("knee_mono1", (4096, 3328), seed=3)
    for name in ("JPEG 2000 lossless", "JPEG baseline 8-bit"):
        if encoder_available(name):
            files[("4096x3328", name)] = encode(large, name, work / "large")
    return files


@pytest.fixture(scope="module")
def classifier():
    if not SHIPPED.is_file():
        pytest.skip("shipped checkpoint absent")
    from osteogate.model.inference import Classifier

    # torch on CPU: the same network as the ONNX file serving uses, without an export in the test.
    return Classifier.load(SHIPPED, backend="torch", device="cpu")


def _file(encoded: dict[tuple[str, str], Path], source: str, name: str) -> Path:
    if (source, name) not in encoded:
        pytest.skip(f"no encoder for {name} here (dcmtk missing?)")
    return encoded[(source, name)]


@pytest.mark.parametrize("name", [n for n in SYNTAXES if n not in REDUCED])
def test_full_size_syntaxes(encoded, name):
    """Lossless syntaxes give exactly the native file's model image; all take the full-size path."""
    path = _file(encoded, "2048x2048", name)
    for variant in ("window", "no VOI"):
        image = dataset_to_image(with_header(pydicom.dcmread(path), variant), 1024)
        assert image.shape == (1024, 1024)
        np.testing.assert_array_equal(
            image, dataset_to_image(with_header(pydicom.dcmread(path), variant), 1024, reduced=False))
        if "lossless" in name or name == "explicit LE":
            native = _file(encoded, "2048x2048", "explicit LE")
            np.testing.assert_array_equal(image, dataset_to_image(with_header(pydicom.dcmread(native), variant), 1024))


def test_full_size_path_is_todays_path(encoded):
    """With a VOI (what DX For Presentation carries) the full-size path equals the previous code,
    decode full then resize_long_side, bit for bit. Without VOI the robust min-max percentiles are
    now taken at the model's size (so they do not depend on the decoder): a small, bounded change."""
    from osteogate.model.preprocess import resize_long_side

    path = _file(encoded, "2048x2048", "explicit LE")
    np.testing.assert_array_equal(dataset_to_image(pydicom.dcmread(path), 1024),
                                  resize_long_side(dataset_to_image(pydicom.dcmread(path)), 1024))
    old = resize_long_side(dataset_to_image(with_header(pydicom.dcmread(path), "no VOI")), 1024)
    new = dataset_to_image(with_header(pydicom.dcmread(path), "no VOI"), 1024)
    assert np.abs(old - new).mean() <= PARITY_MEAN


@pytest.mark.parametrize("variant", ["window", "no VOI", "MONOCHROME1 + rescale", "VOI LUT"])
@pytest.mark.parametrize("name", REDUCED)
def test_reduced_decode_within_tolerance(encoded, classifier, name, variant):
    result = parity(_file(encoded, "2048x2048", name), variant, 1024)
    assert result.reduced.shape == (1024, 1024)
    assert not np.array_equal(result.reduced, result.reference)  # the reduced path really ran
    check(result, f"{name}, 2048x2048 -> 1024, {variant}")
    change = probability_change(classifier, result)
    print(f"  classifier probability change {change:.4f}")
    assert change < PARITY_PROBABILITY


@pytest.mark.parametrize(("source", "name"), [
    ("2500x2000", "JPEG 2000 lossless"), ("2500x2000", "JPEG 2000 lossy"), ("2500x2000", "JPEG baseline 8-bit"),
    ("4096x3328", "JPEG 2000 lossless"), ("4096x3328", "JPEG baseline 8-bit"),
])
def test_reduced_decode_other_sizes(encoded, classifier, source, name):
    """2500x2000: reduced to 1250x1000, then resized to 1024 (not a power-of-two step);
    4096x3328: two levels / 1/4 DCT scale (its full-size reference decode is slow: window only)."""
    for variant in ("window", "no VOI") if source != "4096x3328" else ("window",):
        result = parity(_file(encoded, source, name), variant, 1024)
        assert max(result.reduced.shape) == 1024
        check(result, f"{name}, {source} -> 1024, {variant}")
        change = probability_change(classifier, result)
        print(f"  classifier probability change {change:.4f}")
        assert change < PARITY_PROBABILITY


@pytest.mark.parametrize("name", REDUCED)
def test_reduced_decode_whole_mode(encoded, name):
    """The whole-image mode's small input: 224 px from 2048 (decoded at 1/4, then resized)."""
    for variant in ("window", "no VOI"):
        result = parity(_file(encoded, "2048x2048", name), variant, 224)
        assert max(result.reduced.shape) == 224
        check(result, f"{name}, 2048x2048 -> 224, {variant}", PARITY_P999_WHOLE)


def test_reduced_image_feeds_prepare_unchanged(encoded, classifier):
    """prepare() does no second resize of an image already at needed_long_side: the reduced image is
    the model input's source, with the same shapes as the full path's."""
    spec = classifier.card.input
    long_side = needed_long_side(spec)
    result = parity(_file(encoded, "2048x2048", "JPEG 2000 lossless"), "window", long_side)
    assert max(result.reduced.shape) == long_side
    assert prepare(result.reduced, spec).shape == prepare(result.reference, spec).shape
    np.testing.assert_array_equal(prepare(result.reduced, spec), prepare(result.reduced.copy(), spec))


def test_smaller_than_needed_is_not_enlarged(encoded):
    path = _file(encoded, "2048x2048", "JPEG 2000 lossless")
    image = dataset_to_image(pydicom.dcmread(path), 4096)
    assert image.shape == (2048, 2048)
    np.testing.assert_array_equal(image, dataset_to_image(pydicom.dcmread(path)))


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (12, True), (16, False)])
def test_reduced_jpeg2000_sample_formats(bits, signed):
    """Pillow returns JPEG 2000 samples scaled to its 8/16-bit container and signed ones offset;
    the reduced path undoes both (checked against the full pylibjpeg decode, on a small image)."""
    from pydicom.uid import JPEG2000Lossless

    ds = enlarged_sample("knee_dx", (512, 512), seed=4)
    values = ds.pixel_array.astype(np.int32)  # 12-bit
    values = {8: values >> 4, 12: values - 2048 if signed else values, 16: values << 4}[bits]
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    ds.PixelData = values.astype({8: np.uint8, 12: np.int16 if signed else np.uint16, 16: np.uint16}[bits]).tobytes()
    del ds.WindowCenter, ds.WindowWidth
    ds.compress(JPEG2000Lossless)
    reduced = dataset_to_image(ds, 256)
    reference = dataset_to_image(ds, 256, reduced=False)
    assert reduced.shape == reference.shape == (256, 256)
    assert not np.array_equal(reduced, reference)  # the reduced path really ran (no silent fallback)
    assert np.abs(reduced - reference).mean() <= PARITY_MEAN
