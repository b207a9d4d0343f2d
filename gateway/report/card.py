"""The result card: a Secondary Capture image of the result, for PACS viewers that cannot show an SR.

One card is made for every SR version, from the same ``StudyReport``, into its own series of the
source study (stable series UID, InstanceNumber = result version). It shows, legible both as a PACS
thumbnail and full screen: the study result in a coloured banner, the per-class probabilities as
bars with whole percentages (the same numbers as the SR, see gateway/report/wording.py), the estimated
T-score on a WHO scale with its 80 % prediction interval, which inputs were used or missing, a
downscaled copy of each source image with the analysed regions outlined and its own result, the
model name / version, and the screening-aid disclaimer.

IOD: Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7), single frame, RGB, 8 bit,
uncompressed. It is the one SC every PACS and viewer handles (Orthanc Explorer's preview, OHIF and
Stone, and old PACS that predate the multi-frame SC IODs); colour carries the result category, which
Grayscale SC would lose; one page needs no frames. Text is burned in (BurnedInAnnotation YES) with a
scalable TrueType font found through fontconfig (or the usual font folders): never Pillow's
bitmap fallback, which is unreadable at this size.

The card is built by Pillow (drawing) and highdicom (``SCImage``: patient and study modules copied
from the source header after the same cleaning as the SR's evidence).
"""

from __future__ import annotations

import datetime
import functools
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.sr import SERIES_NUMBER as SR_SERIES_NUMBER
from osteogate.gateway.report.sr import StudyReport, image_identifier, software_version
from osteogate.gateway.work.decoding import thumbnail
from osteogate.model.assessment import Assessment
from osteogate.model.taxonomy import CLASSES, INPUTS, T_SCORE_OSTEOPENIA, T_SCORE_OSTEOPOROSIS
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

__all__ = [
    "CARD_SIZE",
    "SERIES_DESCRIPTION",
    "SERIES_NUMBER",
    "FontUnavailable",
    "build_result_card",
    "find_font",
    "render_card",
    "thumbnail",
]

SERIES_DESCRIPTION = "OsteoGate result card"
SERIES_NUMBER = SR_SERIES_NUMBER + 1
CARD_SIZE = (1600, 1200)  # 4:3 landscape: a whole monitor, ~200 px wide as a PACS thumbnail

# Dark background: radiologists read in dim rooms; a white page would glare.
BACKGROUND = (18, 20, 24)
PANEL = (32, 36, 43)
TEXT = (236, 239, 244)
MUTED = (160, 168, 180)
OUTLINE = (255, 213, 79)  # analysed regions
CLASS_COLOURS = {"normal": (38, 166, 154), "osteopenia": (245, 166, 35), "osteoporosis": (229, 57, 53)}
BANNER_COLOURS = {
    "not assessed": (84, 110, 122),
    "normal": (0, 105, 92),
    "osteopenia": (191, 105, 0),
    "osteoporosis": (183, 28, 28),
}


class FontUnavailable(RuntimeError):
    """No scalable font on this host: the card would be unreadable, so none is made."""


# -- fonts ---------------------------------------------------------------------------------------

_SCALABLE = (".ttf", ".otf", ".ttc")


def _fontconfig(pattern: str) -> Path | None:
    if shutil.which("fc-match") is None:
        return None
    try:
        found = subprocess.run(["fc-match", "--format=%{file}", pattern], capture_output=True, text=True,
                               timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = Path(found) if found else None
    return path if path and path.suffix.lower() in _SCALABLE and path.is_file() else None


# Where Debian (fonts-dejavu-core), Red Hat and Alpine put DejaVu Sans, for hosts without fc-match.
_FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path("/usr/share/fonts/truetype"))


def _font_dirs(bold: bool) -> Path | None:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for root in _FONT_DIRS:
        if root.is_dir():
            found = next(iter(sorted(root.rglob(name))), None)
            if found is not None:
                return found
    return None


@functools.cache
def find_font(bold: bool = False) -> Path:
    """A scalable sans-serif font file: DejaVu Sans (Debian ``fonts-dejavu-core``) via fontconfig,
    else the usual font folders. Raises FontUnavailable rather than using a bitmap fallback."""
    pattern = "DejaVu Sans:bold" if bold else "DejaVu Sans"
    path = _fontconfig(pattern) or _font_dirs(bold)
    if path is None:
        raise FontUnavailable(
            "no scalable font found for the result card: install the Debian package fonts-dejavu-core "
            "(and fontconfig), or set [report] result_card = false"
        )
    return path


@functools.cache
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(find_font(bold)), size)


# -- images --------------------------------------------------------------------------------------


# -- drawing helpers -----------------------------------------------------------------------------


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int,
          max_lines: int | None = None) -> list[str]:
    words = text.split()
    lines: list[str] = []
    current = ""
    for word in words:
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + " ...", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " ..."
    return lines


def _text_block(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: ImageFont.FreeTypeFont,
                width: int, fill: tuple[int, int, int] = TEXT, max_lines: int | None = None,
                spacing: float = 1.25) -> int:
    """Draw wrapped text; returns the y below it."""
    x, y = xy
    step = int(font.size * spacing)
    for line in _wrap(draw, text, font, width, max_lines):
        draw.text((x, y), line, font=font, fill=fill)
        y += step
    return y


def _category(assessment: Assessment) -> str:
    return str(assessment.label) if assessment.assessed else "not assessed"


def _fit(draw: ImageDraw.ImageDraw, text: str, size: int, width: int, bold: bool = True) -> ImageFont.FreeTypeFont:
    """The largest font up to ``size`` in which ``text`` fits ``width``."""
    while size > 14 and draw.textlength(text, font=_font(size, bold)) > width:
        size -= 2
    return _font(size, bold)


# -- sections --------------------------------------------------------------------------------------


def _banner(draw: ImageDraw.ImageDraw, report: StudyReport, width: int) -> int:
    study = report.assessment.study
    height = 190
    draw.rectangle((0, 0, width, height), fill=BANNER_COLOURS[_category(study)])
    # "Low bone density likely: osteopenia range" -> the title alone, as large as a thumbnail needs.
    title, _, qualifier = reporting.headline(study).partition(": ")
    draw.text((40, 14), title.upper(), font=_fit(draw, title.upper(), 92, width - 80), fill=(255, 255, 255))
    if study.assessed:
        detail = (qualifier.capitalize() + "  -  " if qualifier else "") + reporting.result_phrase(study)
        if study.label in ("osteopenia", "osteoporosis") and study.probabilities is not None:
            detail += f"  -  low bone density {reporting.low_bmd_percent(study.probabilities)} %"
        t_text = reporting.t_score_text(study)
        if t_text:
            detail += f"  -  T-score {reporting.fmt_t_score(study.t_score)}"  # type: ignore[arg-type]
        draw.text((42, 116), detail, font=_fit(draw, detail, 40, width - 84, bold=False), fill=(255, 255, 255))
    else:
        _text_block(draw, (42, 110), str(study.reason), _font(30), width - 84, fill=(255, 255, 255), max_lines=2,
                    spacing=1.2)
    return height


def _patient_line(draw: ImageDraw.ImageDraw, header: Dataset, y: int, width: int) -> int:
    name = reporting.text_value(header, "PatientName").replace("^", " ").strip() or "(no name)"
    parts = [name, f"ID {reporting.text_value(header, 'PatientID') or '-'}"]
    birth = reporting.text_value(header, "PatientBirthDate")
    if len(birth) == 8 and birth.isdigit():
        parts.append(f"born {birth[:4]}-{birth[4:6]}-{birth[6:]}")
    study_date = reporting.text_value(header, "StudyDate")
    if len(study_date) == 8 and study_date.isdigit():
        parts.append(f"study {study_date[:4]}-{study_date[4:6]}-{study_date[6:]}")
    for keyword, label in (("AccessionNumber", "acc."), ("StudyDescription", "")):
        value = reporting.text_value(header, keyword, 40)
        if value:
            parts.append(f"{label} {value}".strip())
    draw.rectangle((0, y, width, y + 54), fill=PANEL)
    _text_block(draw, (40, y + 12), "   |   ".join(parts), _font(26), width - 80, fill=TEXT, max_lines=1)
    return y + 54


def _bars(draw: ImageDraw.ImageDraw, study: Assessment, x: int, y: int, width: int) -> int:
    draw.text((x, y), "Probability (whole study)", font=_font(30, True), fill=TEXT)
    y += 50
    if not study.assessed or study.probabilities is None:
        return _text_block(draw, (x, y), f"None reported: the result is not assessed ({study.reason}).",
                           _font(26), width, fill=MUTED, max_lines=5) + 10
    rounded = reporting.percentages(study.probabilities)
    label_w, pct_w = 210, 100
    bar_w = width - label_w - pct_w - 20
    for name in CLASSES:
        emphasis = name == study.label
        draw.text((x, y + 2), name.capitalize(), font=_font(30, emphasis), fill=TEXT if emphasis else MUTED)
        bx = x + label_w
        draw.rectangle((bx, y + 4, bx + bar_w, y + 40), fill=(52, 58, 68))
        filled = int(bar_w * rounded[name] / 100)
        if filled > 0:
            draw.rectangle((bx, y + 4, bx + filled, y + 40), fill=CLASS_COLOURS[name])
        pct = f"{rounded[name]} %"
        font = _font(32, True)
        draw.text((x + width - draw.textlength(pct, font=font), y + 2), pct, font=font, fill=TEXT)
        y += 58
    return y + 6


def _t_scale(draw: ImageDraw.ImageDraw, study: Assessment, x: int, y: int, width: int) -> int:
    if not study.assessed or study.t_score is None:
        return y
    draw.text((x, y), f"Estimated T-score  {reporting.fmt_t_score(study.t_score)}", font=_font(30, True), fill=TEXT)
    y += 48
    low_end, high_end = -4.5, 2.0
    scale_x0, scale_x1 = x + 10, x + width - 10

    def px(value: float) -> int:
        value = min(max(value, low_end), high_end)
        return int(scale_x0 + (value - low_end) / (high_end - low_end) * (scale_x1 - scale_x0))

    zones = ((low_end, T_SCORE_OSTEOPOROSIS, "osteoporosis"), (T_SCORE_OSTEOPOROSIS, T_SCORE_OSTEOPENIA, "osteopenia"),
             (T_SCORE_OSTEOPENIA, high_end, "normal"))
    for start, end, name in zones:
        r, g, b = CLASS_COLOURS[name]
        draw.rectangle((px(start), y + 14, px(end), y + 34), fill=(r // 2, g // 2, b // 2))
    for tick in (-4, -3, -2.5, -2, -1, 0, 1, 2):
        tx = px(tick)
        draw.line((tx, y + 34, tx, y + 42), fill=MUTED, width=2)
        label = reporting.fmt_t_score(tick) if tick else "0"
        font = _font(20)
        draw.text((tx - draw.textlength(label, font=font) / 2, y + 44), label, font=font, fill=MUTED)
    if study.t_score_interval is not None:
        low, high = study.t_score_interval
        draw.rectangle((px(low), y + 19, px(high), y + 29), fill=(255, 255, 255))
    cx = px(study.t_score)
    draw.polygon([(cx, y + 38), (cx - 12, y + 4), (cx + 12, y + 4)], fill=(255, 255, 255), outline=(0, 0, 0))
    y += 74
    if study.t_score_interval is not None:
        low, high = study.t_score_interval
        y = _text_block(draw, (x, y), f"Bar: 80 % prediction interval {reporting.fmt_t_score(low)} to "
                        f"{reporting.fmt_t_score(high)}. WHO: osteoporosis <= -2.5, osteopenia < -1.0",
                        _font(22), width, fill=MUTED)
    return y + 8


def _inputs(draw: ImageDraw.ImageDraw, report: StudyReport, x: int, y: int, width: int, bottom: int) -> int:
    study = report.assessment.study
    draw.text((x, y), "Inputs", font=_font(30, True), fill=TEXT)
    y += 46
    values = reporting.covariate_values(report.assessment.covariates)
    count = sum(1 for i in report.assessment.images if i.score is not None)
    values["image"] = f"{count} radiograph{'s' if count != 1 else ''}"
    font = _font(26)
    for name in INPUTS:
        used = name in study.inputs_used
        if used:
            state = values.get(name, "used")
        elif name in study.inputs_missing:
            state = "missing"
        elif name == "image" and count or name in values:
            state = "available, not used"  # the note below says why
        else:
            continue
        mark_colour = CLASS_COLOURS["normal"] if used else (120, 126, 136)
        draw.ellipse((x, y + 6, x + 18, y + 24), fill=mark_colour if used else None, outline=mark_colour, width=3)
        draw.text((x + 30, y), f"{reporting.INPUT_LABELS.get(name, name)}: {state}", font=font,
                  fill=TEXT if used else MUTED)
        y += 36
    # Notes and validation figures in the room left above the footer (the SR has them in full).
    small = _font(20)
    step = int(small.size * 1.25)
    texts = [*reporting.notes(study, report.assessment.covariates)]
    validation = reporting.validation_text(study)
    if validation:
        texts.append(validation)
    for text in texts:
        room = (bottom - y) // step
        if room < 1:
            break
        y = _text_block(draw, (x, y), text, small, width, fill=MUTED, max_lines=min(2, room)) + 4
    return y


def _grid(n: int) -> tuple[int, int]:
    if n <= 1:
        return 1, 1
    if n <= 2:
        return 2, 1
    if n <= 4:
        return 2, 2
    return 3, 2


def _images(card: Image.Image, draw: ImageDraw.ImageDraw, report: StudyReport, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    images = report.images
    skipped = report.skipped
    draw.text((x0, y0), "Images", font=_font(30, True), fill=TEXT)
    if any(thumb is not None and image.result.score and image.result.score.boxes for _, image, thumb in images):
        legend = "outlined: regions the model analysed"
        legend_font = _font(20)
        draw.text((x1 - draw.textlength(legend, font=legend_font), y0 + 8), legend, font=legend_font, fill=OUTLINE)
    y0 += 48
    footer = 40 if skipped else 0
    cols, rows = _grid(len(images))
    capacity = cols * rows
    shown = images if len(images) <= capacity else images[: capacity - 1]
    cell_w = (x1 - x0 - (cols - 1) * 16) // cols
    cell_h = (y1 - footer - y0 - (rows - 1) * 16) // rows
    caption_h = 108

    def caption_of(number: int, image: Any) -> str:
        view = reporting.text_value(image.source, "ViewPosition", 8)
        return image_identifier(number, image.result.region, image.source).capitalize() + (f"  {view}" if view else "")

    captions = [caption_of(number, image) for number, image, _ in shown]
    # One caption size for every cell (the longest caption decides), so the grid reads evenly.
    caption_font = min((_fit(draw, c, 26, cell_w - 24, False) for c in captions), key=lambda f: f.size,
                       default=_font(26))
    for index, (_, image, thumb) in enumerate(shown):
        cx = x0 + (index % cols) * (cell_w + 16)
        cy = y0 + (index // cols) * (cell_h + 16)
        draw.rectangle((cx, cy, cx + cell_w, cy + cell_h), fill=PANEL)
        area = (cx + 8, cy + 8, cx + cell_w - 8, cy + cell_h - caption_h)
        result = image.result.assessment
        _draw_thumbnail(card, draw, thumb, area, image.result.score.boxes if image.result.score else (),
                        dim=not result.assessed)
        draw.text((cx + 12, cy + cell_h - caption_h + 6), captions[index], font=caption_font, fill=TEXT)
        colour = CLASS_COLOURS.get(str(result.label), MUTED) if result.assessed else MUTED
        _text_block(draw, (cx + 12, cy + cell_h - caption_h + 40), reporting.result_phrase(result),
                    _font(24 if result.assessed else 20, result.assessed), cell_w - 24, fill=colour,
                    max_lines=2 if result.assessed else 3, spacing=1.1)
    if len(images) > len(shown):
        cx = x0 + (len(shown) % cols) * (cell_w + 16)
        cy = y0 + (len(shown) // cols) * (cell_h + 16)
        draw.rectangle((cx, cy, cx + cell_w, cy + cell_h), fill=PANEL)
        _text_block(draw, (cx + 20, cy + cell_h // 2 - 40), f"+{len(images) - len(shown)} more image(s): see the SR",
                    _font(30, True), cell_w - 40, fill=MUTED)
    if skipped:
        reasons = sorted({s.reason for s in skipped})
        text = f"Not classified: {len(skipped)} image(s) ({'; '.join(reasons)})"
        _text_block(draw, (x0, y1 - footer + 6), text, _font(22), x1 - x0, fill=MUTED, max_lines=1)


def _draw_thumbnail(card: Image.Image, draw: ImageDraw.ImageDraw, thumb: Any, area: tuple[int, int, int, int],
                    boxes: Sequence[tuple[float, float, float, float]], dim: bool) -> None:
    ax0, ay0, ax1, ay1 = area
    if thumb is None:
        _text_block(draw, (ax0 + 20, (ay0 + ay1) // 2 - 20), "image not available", _font(24), ax1 - ax0 - 40,
                    fill=MUTED)
        return
    picture = Image.fromarray(np.asarray(thumb, dtype=np.uint8), mode="L").convert("RGB")
    scale = min((ax1 - ax0) / picture.width, (ay1 - ay0) / picture.height)
    size = (max(1, int(picture.width * scale)), max(1, int(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.LANCZOS)
    if dim:
        picture = Image.blend(picture, Image.new("RGB", size, BACKGROUND), 0.45)
    px0 = ax0 + (ax1 - ax0 - size[0]) // 2
    py0 = ay0 + (ay1 - ay0 - size[1]) // 2
    card.paste(picture, (px0, py0))
    for bx0, by0, bx1, by1 in boxes:
        rect = (px0 + bx0 * size[0], py0 + by0 * size[1], px0 + bx1 * size[0], py0 + by1 * size[1])
        draw.rectangle(rect, outline=OUTLINE, width=3)


def _footer(draw: ImageDraw.ImageDraw, report: StudyReport, version: int, created: datetime.datetime,
            width: int, height: int) -> None:
    top = height - 128
    draw.rectangle((0, top, width, height), fill=(0, 0, 0))
    warning = "SCREENING AID, NOT A DIAGNOSIS  -  NOT CLEARED FOR CLINICAL USE  -  CONFIRM WITH DXA"
    draw.text((40, top + 14), warning, font=_fit(draw, warning, 36, width - 80), fill=(255, 213, 79))
    algorithm = report.algorithm
    model = (f"Model {algorithm.name} {algorithm.version} (sha256 {algorithm.checkpoint_sha256[:12]})  |  "
             f"OsteoGate {software_version()}  |  result version {version}  |  made {created:%Y-%m-%d %H:%M}")
    _text_block(draw, (40, top + 66), model, _font(22), width - 80, fill=MUTED, max_lines=1)
    _text_block(draw, (40, top + 96), "PRELIMINARY machine result: the full result with codes is in the OsteoGate "
                "SR of this study.", _font(20), width - 80, fill=MUTED, max_lines=1)


def render_card(report: StudyReport, *, version: int, created: datetime.datetime) -> Image.Image:
    """The card as an RGB picture (the DICOM object's pixels; tests save it as PNG to look at)."""
    width, height = CARD_SIZE
    card = Image.new("RGB", CARD_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(card)
    y = _banner(draw, report, width)
    header = report.images[0][1].source if report.images else Dataset()
    y = _patient_line(draw, header, y, width)
    top = y + 24
    bottom = height - 128 - 20
    left_w = 640
    study = report.assessment.study
    ly = _bars(draw, study, 40, top, left_w)
    ly = _t_scale(draw, study, 40, ly + 10, left_w)
    _inputs(draw, report, 40, ly + 10, left_w, bottom)
    _images(card, draw, report, (40 + left_w + 40, top, width - 40, bottom))
    _footer(draw, report, version, created, width, height)
    return card


# -- DICOM -------------------------------------------------------------------------------------


def build_result_card(
    report: StudyReport,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    content_datetime: datetime.datetime | None = None,
    institution_name: str | None = None,
    series_number: int = SERIES_NUMBER,
) -> hd.sc.SCImage:
    """The card as a DICOM Secondary Capture Image in the source study (see the module docstring)."""
    if not report.sources:
        raise ValueError("a result card needs at least one source image")
    now = content_datetime or datetime.datetime.now()
    ordered = [image.source for _, image, _ in report.images]
    reference = reporting.evidence_header(ordered[0])
    pixels = np.asarray(render_card(report, version=instance_number, created=now), dtype=np.uint8)
    card = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        # highdicom asks for a coordinate system; the card is a page, not a view of the patient, so
        # its PatientOrientation is emptied below (Type 2C: present, empty).
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=report.algorithm.manufacturer,
        transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian: every PACS takes it
        manufacturer_model_name=report.algorithm.name[:64],
        software_versions=[f"osteogate {software_version()}"[:64], f"model {report.algorithm.version}"[:64]],
        series_description=SERIES_DESCRIPTION,
        institution_name=institution_name,
    )
    card.PatientOrientation = ""
    # General Series Laterality is Type 2C for paired parts such as the knee: the side when every
    # source image states the same one, else present and empty (never a guessed side).
    sides = {reporting.laterality(source) for source in ordered}
    card.Laterality = sides.pop() if len(sides) == 1 and sides <= {"R", "L"} else ""
    card.ConversionType = "SYN"  # synthetic image: drawn by software, not digitised
    card.BurnedInAnnotation = "YES"
    card.ImageComments = "OsteoGate result card: screening aid, not a diagnosis; not cleared for clinical use"
    card.DerivationDescription = "Result card drawn from the OsteoGate result and downscaled source images"
    card.SeriesDate = card.ContentDate = card.DateOfSecondaryCapture = now.strftime("%Y%m%d")
    card.SeriesTime = card.ContentTime = card.TimeOfSecondaryCapture = now.strftime("%H%M%S")
    # Patient Study module values (age, size, weight) of the source, when valid.
    for keyword in ("PatientAge", "PatientSize", "PatientWeight", "StudyDescription", "IssuerOfPatientID"):
        if keyword in reference and keyword not in card:
            card[keyword] = reference[keyword]
    purpose = hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    references = []
    for source in ordered:
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        item.PurposeOfReferenceCodeSequence = [purpose]
        references.append(item)
    card.SourceImageSequence = references
    reporting.ensure_charset(card)
    return card
