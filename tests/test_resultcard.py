"""Result card (gateway/report/card.py): a real font, a valid Secondary Capture, and a picture that shows
what the SR says. Set OSTEOGATE_CARD_DIR to keep the rendered PNGs for a look."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.gateway.report import card_layout as resultcard
from osteogate.gateway.report.card import (
    CARD_SIZE,
    SERIES_DESCRIPTION,
    build_result_card,
    find_font,
    render_card,
)
from osteogate.gateway.report.card_draw import BANNER_COLOURS, OUTLINE
from osteogate.gateway.report.sr import SkippedImage
from osteogate.gateway.work.decoding import thumbnail
from PIL import Image, ImageFont
from pydicom.uid import SecondaryCaptureImageStorage

from tests.report_data import (
    CR,
    DX,
    NO_COVARIATES,
    OTHER_P,
    assessed,
    dciodvfy_errors,
    image_result,
    knee_report,
    make_image,
    not_assessed,
    uid,
)

WHEN = datetime.datetime(2024, 1, 2, 11, 0, 0)
LOW_P = {"normal": 0.7, "osteopenia": 0.25, "osteoporosis": 0.05}


def keep(picture: Image.Image, name: str, tmp_path: Path) -> Path:
    target = Path(os.environ.get("OSTEOGATE_CARD_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{name}.png"
    picture.save(path)
    return path


def card(report=None, **kwargs):
    args = {"series_instance_uid": uid("card-series"), "sop_instance_uid": uid("card-1"), "instance_number": 1,
            "content_datetime": WHEN}
    args.update(kwargs)
    return build_result_card(report or knee_report(), **args)


# -- font ------------------------------------------------------------------------------------------


def test_real_scalable_font_is_found() -> None:
    """Fails where only Pillow's bitmap fallback exists: install fonts-dejavu-core (and fontconfig)."""
    regular, bold = find_font(False), find_font(True)
    for path in (regular, bold):
        assert path.suffix.lower() in (".ttf", ".otf", ".ttc") and path.is_file()
        font = ImageFont.truetype(str(path), 40)
        assert "DejaVu" in font.getname()[0], f"expected DejaVu Sans, got {font.getname()}"
        # A scalable font grows with its size; the bitmap fallback would not be a FreeTypeFont at all.
        assert font.getbbox("OSTEOPOROSIS")[2] > 2 * ImageFont.truetype(str(path), 16).getbbox("OSTEOPOROSIS")[2]
    assert "Bold" in bold.name
    assert resultcard.font(30).path == str(regular)  # what the card draws with


def test_no_font_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resultcard, "_fontconfig", lambda pattern: None)
    monkeypatch.setattr(resultcard, "_font_dirs", lambda bold: None)
    resultcard.find_font.cache_clear()
    try:
        with pytest.raises(resultcard.FontUnavailable, match="fonts-dejavu-core"):
            find_font()
    finally:
        monkeypatch.undo()
        resultcard.find_font.cache_clear()


# -- DICOM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["assessed", "not assessed", "cr minimal"])
def test_card_is_valid_secondary_capture(tmp_path: Path, case: str) -> None:
    if case == "assessed":
        report = knee_report()
    elif case == "not assessed":
        report = knee_report(study=not_assessed(), images=(image_result(not_assessed()),) * 2, covariates=NO_COVARIATES)
    else:
        source = make_image(CR, "study-a", "series-cr", "bare", "KNEE", minimal=True)
        report = knee_report(sources=(source,), images=(image_result(not_assessed()),), thumbnails=False)
    path = tmp_path / "card.dcm"
    card(report).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    source = report.sources[0]
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1200, 1600, 3, "RGB")
    assert ds.BurnedInAnnotation == "YES" and ds.Modality == "OT" and ds.ConversionType == "SYN"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyID"):
        assert ds[keyword].value == source[keyword].value
    assert ds.SeriesDescription == SERIES_DESCRIPTION and ds.SeriesNumber == 9902
    assert (ds.SeriesDate, ds.ContentDate) == ("20240102", "20240102")
    assert ds.InstanceNumber == 1
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == [s.SOPInstanceUID for s in report.sources]
    assert "not cleared for clinical use" in ds.ImageComments


def test_card_laterality_never_guessed() -> None:
    right = make_image(DX, "study-a", "s", "r", "KNEE", "R")
    assert card(knee_report(sources=(right,), images=(image_result(not_assessed()),))).Laterality == "R"
    assert card(knee_report()).Laterality == ""  # right and left knees: no single side


# -- the picture ------------------------------------------------------------------------------------


def _pixel(picture: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return picture.getpixel(xy)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("name", "study", "category"),
    [
        ("referral", None, "referral"),
        ("not-assessed", not_assessed(), "not assessed"),
        ("below", assessed("normal", LOW_P, ("image",)), "below"),
    ],
)
def test_banner_colour_follows_the_decision(tmp_path: Path, name: str, study, category: str) -> None:
    report = knee_report(study=study) if study else knee_report()
    picture = render_card(report, version=1, created=WHEN)
    keep(picture, f"card-{name}", tmp_path)
    assert picture.size == CARD_SIZE
    assert _pixel(picture, (8, 8)) == BANNER_COLOURS[category]
    # The banner's headline is drawn in white, anti-aliased (a scalable font, not a bitmap one).
    banner = np.asarray(picture.crop((0, 0, CARD_SIZE[0], 120)))
    assert (banner == 255).all(axis=-1).sum() > 5000
    assert len(np.unique(banner.reshape(-1, 3), axis=0)) > 20


def test_analysed_regions_outlined(tmp_path: Path) -> None:
    with_boxes = np.asarray(render_card(knee_report(), version=1, created=WHEN))
    without = knee_report(images=(image_result(assessed("normal", LOW_P, ("image",)), boxes=()),) * 2)
    plain = np.asarray(render_card(without, version=1, created=WHEN))
    right_half = (slice(250, 1000), slice(720, 1560))
    outline = np.all(with_boxes[right_half] == OUTLINE, axis=-1).sum()
    assert outline > 1000
    assert np.all(plain[right_half] == OUTLINE, axis=-1).sum() == 0  # no boxes, no legend either


def test_many_images_and_missing_thumbnails(tmp_path: Path) -> None:
    sources = tuple(make_image(DX, "study-a", "s", f"k{n}", "KNEE", "RL"[n % 2], number=n) for n in range(7))
    images = tuple(image_result(assessed("normal", OTHER_P, ("image",))) for _ in sources)
    skipped = (SkippedImage(make_image(DX, "study-a", "s", "chest", "CHEST"), "out of scope: CHEST"),)
    report = knee_report(sources=sources, images=images, skipped=skipped, thumbnails=False)
    picture = render_card(report, version=3, created=WHEN)
    keep(picture, "card-seven-images", tmp_path)
    path = tmp_path / "card.dcm"
    card(report, instance_number=3).save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).InstanceNumber == 3


def test_thumbnail_is_small_uint8() -> None:
    image = np.linspace(0, 1, 2000 * 1500, dtype=np.float32).reshape(2000, 1500)
    small = thumbnail(image)
    assert small.dtype == np.uint8 and max(small.shape) == 512 and small.shape[0] > small.shape[1]
    assert small.min() < 10 and small.max() > 245
    assert thumbnail(np.full((100, 80), 7.0)).max() == 0  # constant, out of [0, 1]: no crash, dark
    assert thumbnail(np.arange(60, dtype=np.uint8).reshape(6, 10)).shape == (6, 10)
