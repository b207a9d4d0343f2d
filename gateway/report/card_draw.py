"""Drawing the result card's sections (banner, patient line, probabilities, T-score scale, inputs,
images, footer). Every string goes through ``card_layout.place``: wrapped and shrunk to its box,
recorded in the ``Layout`` the tests read."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import numpy as np
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.card_layout import Layout, place
from osteogate.gateway.report.content import StudyReport
from osteogate.gateway.report.sr import image_identifier, software_version
from osteogate.model.assessment import Assessment
from osteogate.model.estimand import REFERRAL
from osteogate.model.taxonomy import CLASSES, INPUTS, T_SCORE_OSTEOPENIA, T_SCORE_OSTEOPOROSIS
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

CARD_SIZE = (1600, 1200)  # 4:3 landscape: a whole monitor, ~200 px wide as a PACS thumbnail
BACKGROUND = (18, 20, 24)
PANEL = (32, 36, 43)
TEXT = (236, 239, 244)
MUTED = (160, 168, 180)
WHITE = (255, 255, 255)
OUTLINE = (255, 213, 79)  # analysed regions
CLASS_COLOURS = {"normal": (38, 166, 154), "osteopenia": (245, 166, 35), "osteoporosis": (229, 57, 53)}
# The banner's colour is the decision's, not a class's: a result below the threshold is not "green".
BANNER_COLOURS = {"referral": (198, 40, 40), "below": (55, 71, 79), "not assessed": (84, 88, 96)}
BANNER_HEIGHT = 200
FOOTER_HEIGHT = 128


def _banner(draw: ImageDraw.ImageDraw, layout: Layout, report: StudyReport, width: int) -> int:
    study = report.assessment.study
    if not study.assessed:
        colour = BANNER_COLOURS["not assessed"]
    else:
        colour = BANNER_COLOURS["referral" if reporting.decision_words(study) == REFERRAL else "below"]
    draw.rectangle((0, 0, width, BANNER_HEIGHT), fill=colour)
    # The headline in one block, as large as the box allows: decision, estimate, interval,
    # category and what was read.
    place(draw, layout, reporting.headline(study), (40, 14, width - 40, BANNER_HEIGHT - 10), 52, WHITE, bold=True,
          spacing=1.15)
    return BANNER_HEIGHT


def _patient_line(draw: ImageDraw.ImageDraw, layout: Layout, header: Dataset, y: int, width: int) -> int:
    name = reporting.text_value(header, "PatientName").replace("^", " ").strip() or "(no name)"
    parts = [f"ID {reporting.text_value(header, 'PatientID') or '-'}"]
    birth = reporting.text_value(header, "PatientBirthDate")
    if len(birth) == 8 and birth.isdigit():
        parts.append(f"born {birth[:4]}-{birth[4:6]}-{birth[6:]}")
    study_date = reporting.text_value(header, "StudyDate")
    if len(study_date) == 8 and study_date.isdigit():
        parts.append(f"study {study_date[:4]}-{study_date[4:6]}-{study_date[6:]}")
    for keyword, label in (("AccessionNumber", "acc."), ("StudyDescription", "")):
        value = reporting.text_value(header, keyword)
        if value:
            parts.append(f"{label} {value}".strip())
    height = 64
    draw.rectangle((0, y, width, y + height), fill=PANEL)
    # The name in its own box (it may need another script's font), the rest beside it.
    place(draw, layout, name, (40, y + 8, 560, y + height - 4), 26, TEXT, bold=True)
    place(draw, layout, "   |   ".join(parts), (580, y + 8, width - 40, y + height - 4), 24, TEXT)
    return y + height


def _bars(draw: ImageDraw.ImageDraw, layout: Layout, study: Assessment, x: int, y: int, width: int) -> int:
    y = place(draw, layout, "Probability (from the T-score estimate)", (x, y, x + width, y + 40), 28, TEXT, bold=True)
    y += 8
    if not study.assessed or study.probabilities is None:
        return place(draw, layout, f"None reported: the result is not assessed ({study.reason}).",
                     (x, y, x + width, y + 150), 26, MUTED) + 10
    rounded = reporting.percentages(study.probabilities)
    label_w, pct_w = 230, 100
    bar_w = width - label_w - pct_w - 20
    names = {name: words[0].upper() + words[1:] for name, words in reporting.PROBABILITY_WORDS.items()}
    for name in CLASSES:
        emphasis = name == study.label  # the category of the estimate, never another class
        place(draw, layout, names[name], (x, y + 2, x + label_w - 10, y + 44), 30, TEXT if emphasis else MUTED,
              bold=emphasis)
        bx = x + label_w
        draw.rectangle((bx, y + 4, bx + bar_w, y + 40), fill=(52, 58, 68))
        filled = int(bar_w * rounded[name] / 100)
        if filled > 0:
            draw.rectangle((bx, y + 4, bx + filled, y + 40), fill=CLASS_COLOURS[name])
        place(draw, layout, f"{rounded[name]} %", (x + width - pct_w, y + 2, x + width, y + 44), 32, TEXT, bold=True,
              align="right")
        y += 56
    basis = reporting.decision_basis(study)
    if basis:
        y = place(draw, layout, basis, (x, y, x + width, y + 34), 24, MUTED)
    return y + 6


def _t_scale(draw: ImageDraw.ImageDraw, layout: Layout, study: Assessment, x: int, y: int, width: int) -> int:
    if not study.assessed or study.t_score is None:
        return y
    y = place(draw, layout, reporting.t_score_text(study) or "", (x, y, x + width, y + 80), 28, TEXT, bold=True)
    y += 6
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
        place(draw, layout, label, (tx - 24, y + 44, tx + 24, y + 70), 20, MUTED)
    if study.t_score_interval is not None:
        low, high = study.t_score_interval
        draw.rectangle((px(low), y + 19, px(high), y + 29), fill=WHITE)
    cx = px(study.t_score)
    draw.polygon([(cx, y + 38), (cx - 12, y + 4), (cx + 12, y + 4)], fill=WHITE, outline=(0, 0, 0))
    y += 74
    y = place(draw, layout, "White bar: the 80 % interval. WHO ranges: osteoporosis -2.5 or below, osteopenia "
              "below -1.0.", (x, y, x + width, y + 60), 22, MUTED)
    return y + 8


def _input_state(name: str, study: Assessment, values: dict[str, str], count: int) -> str | None:
    if name in study.inputs_used:
        return values.get(name, "used")
    if name in study.inputs_missing:
        return "missing"
    if (name == "image" and count) or name in values:
        return "available, not used"  # the note below says why
    return None


def _inputs(draw: ImageDraw.ImageDraw, layout: Layout, report: StudyReport, x: int, y: int, width: int,
            bottom: int) -> int:
    study = report.assessment.study
    y = place(draw, layout, "Inputs", (x, y, x + width, y + 40), 28, TEXT, bold=True) + 4
    values = reporting.covariate_values(report.assessment.covariates)
    count = sum(1 for i in report.assessment.images if i.score is not None)
    values["image"] = f"{count} radiograph{'s' if count != 1 else ''}"
    for name in INPUTS:
        state = _input_state(name, study, values, count)
        if state is None:
            continue
        used = name in study.inputs_used
        mark_colour = CLASS_COLOURS["normal"] if used else (120, 126, 136)
        draw.ellipse((x, y + 6, x + 18, y + 24), fill=mark_colour if used else None, outline=mark_colour, width=3)
        y = place(draw, layout, f"{reporting.INPUT_LABELS.get(name, name)}: {state}", (x + 30, y, x + width, y + 34),
                  26, TEXT if used else MUTED)
    # Notes and the producing head's validation in the room left (the SR has them in full).
    texts = [*reporting.notes(study, report.assessment.covariates)]
    validation = reporting.validation_text(study)
    if validation:
        texts.append(validation)
    room = max(bottom - y - 6, 20 * len(texts))
    for text in texts:
        share = max(room // max(len(texts), 1), 24)
        y = place(draw, layout, text, (x, y + 4, x + width, y + 4 + share), 20, MUTED, spacing=1.15)
    return y


def _grid(n: int) -> tuple[int, int]:
    if n <= 1:
        return 1, 1
    if n <= 2:
        return 2, 1
    if n <= 4:
        return 2, 2
    return 3, 2


def _caption(number: int, image: Any) -> str:
    view = reporting.text_value(image.source, "ViewPosition", 16)
    return image_identifier(number, image.result.region, image.source).capitalize() + (f"  {view}" if view else "")


def _image_cell(card: Image.Image, draw: ImageDraw.ImageDraw, layout: Layout, report: StudyReport, image: Any,
                thumb: Any, number: int, cell: tuple[int, int, int, int]) -> None:
    cx, cy, cx1, cy1 = cell
    # Small cells (a grid of many images) give the caption more of their height: a long reason wraps.
    caption_h = 120 if cy1 - cy > 420 else min((cy1 - cy) // 2, 170)
    draw.rectangle(cell, fill=PANEL)
    result = image.result.assessment
    # Outline analysed regions only where the result read this radiograph: a result from the header
    # alone must not suggest the film was read.
    read = report.image_used and result.assessed
    boxes = image.result.score.boxes if read and image.result.score else ()
    _thumbnail(card, draw, layout, thumb, (cx + 8, cy + 8, cx1 - 8, cy1 - caption_h), boxes, dim=not read)
    place(draw, layout, _caption(number, image), (cx + 12, cy1 - caption_h + 4, cx1 - 12, cy1 - caption_h + 36), 24,
          TEXT)
    if read:
        words, colour = reporting.result_phrase(result), CLASS_COLOURS.get(str(result.label), MUTED)
    else:
        reason = result.reason if not result.assessed else "the study result comes from the header"
        words, colour = f"not used: {reason}", MUTED
    place(draw, layout, words, (cx + 12, cy1 - caption_h + 40, cx1 - 12, cy1 - 6), 22, colour, spacing=1.1)


def _images(card: Image.Image, draw: ImageDraw.ImageDraw, layout: Layout, report: StudyReport,
            box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    images = report.images
    skipped = report.skipped
    place(draw, layout, "Images", (x0, y0, x0 + 200, y0 + 40), 28, TEXT, bold=True)
    if report.image_used and any(thumb is not None and image.result.score and image.result.score.boxes
                                 for _, image, thumb in images):
        place(draw, layout, "outlined: regions the model analysed", (x0 + 220, y0 + 8, x1, y0 + 36), 20, OUTLINE,
              align="right")
    elif images:
        place(draw, layout, "the radiographs were not used for this result", (x0 + 220, y0 + 8, x1, y0 + 36), 20,
              MUTED, align="right")
    y0 += 48
    # Room for the skipped images' reasons grows with how many different reasons there are.
    footer = min(40 + 26 * len({s.reason for s in skipped}), 150) if skipped else 0
    cols, rows = _grid(len(images))
    capacity = cols * rows
    shown = images if len(images) <= capacity else images[: capacity - 1]
    cell_w = (x1 - x0 - (cols - 1) * 16) // cols
    cell_h = (y1 - footer - y0 - (rows - 1) * 16) // rows
    for index, (number, image, thumb) in enumerate(shown):
        cx = x0 + (index % cols) * (cell_w + 16)
        cy = y0 + (index // cols) * (cell_h + 16)
        _image_cell(card, draw, layout, report, image, thumb, number, (cx, cy, cx + cell_w, cy + cell_h))
    if len(images) > len(shown):
        cx = x0 + (len(shown) % cols) * (cell_w + 16)
        cy = y0 + (len(shown) // cols) * (cell_h + 16)
        draw.rectangle((cx, cy, cx + cell_w, cy + cell_h), fill=PANEL)
        place(draw, layout, f"+{len(images) - len(shown)} more image(s): see the SR",
              (cx + 20, cy + cell_h // 2 - 40, cx + cell_w - 20, cy + cell_h - 10), 30, MUTED, bold=True)
    if skipped:
        reasons = sorted({s.reason for s in skipped})
        text = f"Not classified: {len(skipped)} image(s) ({'; '.join(reasons)})"
        place(draw, layout, text, (x0, y1 - footer + 4, x1, y1), 22, MUTED, spacing=1.1)


def _thumbnail(card: Image.Image, draw: ImageDraw.ImageDraw, layout: Layout, thumb: Any,
               area: tuple[int, int, int, int], boxes: Sequence[tuple[float, float, float, float]], dim: bool) -> None:
    ax0, ay0, ax1, ay1 = area
    if thumb is None:
        place(draw, layout, "image not available", (ax0 + 20, (ay0 + ay1) // 2 - 20, ax1 - 20, (ay0 + ay1) // 2 + 40),
              24, MUTED)
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


def _footer(draw: ImageDraw.ImageDraw, layout: Layout, report: StudyReport, version: int,
            created: datetime.datetime, width: int, height: int) -> None:
    top = height - FOOTER_HEIGHT
    draw.rectangle((0, top, width, height), fill=(0, 0, 0))
    warning = "SCREENING AID, NOT A DIAGNOSIS  -  NOT CLEARED FOR CLINICAL USE  -  CONFIRM WITH DXA"
    place(draw, layout, warning, (40, top + 10, width - 40, top + 56), 36, OUTLINE, bold=True)
    algorithm = report.algorithm
    model = (f"Result by {report.producer} {algorithm.version} (checkpoint sha256 {algorithm.checkpoint_sha256[:12]})"
             f"  |  OsteoGate {software_version()}  |  result version {version}  |  made {created:%Y-%m-%d %H:%M}")
    place(draw, layout, model, (40, top + 60, width - 40, top + 90), 22, MUTED)
    place(draw, layout, "PRELIMINARY machine result: the full result with codes is in the OsteoGate SR of this "
          "study.", (40, top + 94, width - 40, top + 122), 20, MUTED)


def draw_card(report: StudyReport, *, version: int, created: datetime.datetime) -> tuple[Image.Image, Layout]:
    """The card as an RGB picture, with the layout of every string on it.

    Parameters
    ----------
    report : StudyReport
        The result.
    version : int
        The result version.
    created : datetime.datetime
        When it was made.

    Returns
    -------
    tuple of (PIL.Image.Image, Layout)
    """
    width, height = CARD_SIZE
    card = Image.new("RGB", CARD_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(card)
    layout = Layout()
    y = _banner(draw, layout, report, width)
    header = report.images[0][1].source if report.images else Dataset()
    y = _patient_line(draw, layout, header, y, width)
    top = y + 20
    bottom = height - FOOTER_HEIGHT - 16
    left_w = 640
    study = report.assessment.study
    ly = _bars(draw, layout, study, 40, top, left_w)
    ly = _t_scale(draw, layout, study, 40, ly + 8, left_w)
    _inputs(draw, layout, report, 40, ly + 8, left_w, bottom)
    _images(card, draw, layout, report, (40 + left_w + 40, top, width - 40, bottom))
    _footer(draw, layout, report, version, created, width, height)
    return card, layout
