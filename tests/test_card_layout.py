"""Result card text layout (gateway/report/card_layout.py): every string fits its box, measured with
the font's own metrics, words are never cut, and names in other scripts are drawn or plainly not shown
(never mojibake)."""

from __future__ import annotations

import pydicom
import pytest
from osteogate.gateway.report import card_layout
from osteogate.gateway.report.card import CARD_SIZE, layout_card
from osteogate.gateway.report.card_layout import NOT_SHOWN, Layout
from osteogate.gateway.report.sr import SkippedImage
from osteogate.model.gate import CHANCE_AUC, MIN_POSITIVE_LR, discrimination_reason, operating_point_reason  # noqa: F401 - the reasons come from the gate
from pydicom.dataset import Dataset

from tests.report_data import (
    COVARIATES,
    DX,
    assessed,
    image_result,
    knee_report,
    make_image,
    not_assessed,
)

# The longest reasons the gate and the worker give (model/gate.py, gateway/work).
LONG_REASONS = (
    discrimination_reason({"auc_low_bmd": {"value": 0.49, "ci_low": 0.34, "ci_high": 0.65}},
                          "the inputs image, sex, weight, height"),
    operating_point_reason({"specificity_low_bmd": {"value": 0.42, "ci_low": 0.2, "ci_high": 0.6},
                            "sensitivity_low_bmd": {"value": 0.94, "ci_low": 0.9, "ci_high": 0.98}},
                           "the inputs sex, weight, height"),
    "no usable inputs (no image path and no age, sex, weight or height in the header)",
    "the spine image head is untrained on real data",
)
LONG_DESCRIPTION = "XR LUMBAR SPINE 2 VIEWS AP AND LATERAL WITH FLEXION EXTENSION STUDY"[:64]
NAMES = {
    "latin-64": ("ISO_IR 100", "Abcdefghijklmnopqrstuvwxyz^Abcdefghijklmnopqrstuvwxyz^Abcdefghijk"[:64]),
    "utf8-greek-cyrillic": ("ISO_IR 192", "Παπαδόπουλος^Αλέξανδρος=Шостакович^Дмитрий"),
    "utf8-cjk": ("ISO_IR 192", "山田^太郎=やまだ^たろう"),
    "gb18030": ("GB18030", "王^小明"),
}


def _check(layout: Layout) -> None:
    width, height = CARD_SIZE
    assert layout.items
    for item in layout.items:
        x0, y0, x1, y1 = item.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, item
        for line, advance in zip(item.lines, item.widths(), strict=True):
            assert advance <= x1 - x0 + 0.5, f"{line!r} is {advance:.0f} px in a {x1 - x0} px box"
        # Wrapped at spaces only: the lines joined are the text, every word whole.
        assert " ".join(item.lines) == " ".join(item.text.split()), item
        step = int(item.size * 1.25)
        assert len(item.lines) * item.size <= (y1 - y0) + step, f"{item.text!r} overflows its box height"


def _named(charset: str, name: str) -> Dataset:
    source = make_image(DX, "study-a", "s", f"named-{charset}", "KNEE", "R")
    source.SpecificCharacterSet = charset
    source.PatientName = name
    source.StudyDescription = LONG_DESCRIPTION
    return source


@pytest.mark.parametrize("reason", LONG_REASONS)
def test_longest_reasons_fit(reason: str) -> None:
    report = knee_report(study=not_assessed(reason), images=(image_result(not_assessed(reason)),) * 2)
    layout = layout_card(report)
    _check(layout)
    assert reason.split()[-1] in layout.text()  # the whole reason is printed, to its last word


def test_longest_result_strings_fit() -> None:
    study = assessed("osteopenia", {"normal": 0, "osteopenia": 0, "osteoporosis": 0}, ("age", "sex", "weight", "height"),
                     -1.06, (-2.96, 0.84), notes=tuple(LONG_REASONS[:2]))
    skipped = tuple(SkippedImage(make_image(DX, "study-a", "s", f"skip{n}", "CHEST"), reason)
                    for n, reason in enumerate(LONG_REASONS))
    sources = tuple(_named("ISO_IR 100", NAMES["latin-64"][1]) if n == 0 else
                    make_image(DX, "study-a", "s", f"k{n}", "KNEE", "L", number=n + 1) for n in range(7))
    images = tuple(image_result(not_assessed(LONG_REASONS[n % len(LONG_REASONS)])) for n in range(7))
    layout = layout_card(knee_report(study=study, sources=sources, images=images, skipped=skipped))
    _check(layout)
    text = layout.text()
    assert NAMES["latin-64"][1].replace("^", " ") in " ".join(text.split())  # no name cut off
    assert LONG_DESCRIPTION in " ".join(text.split())


@pytest.mark.parametrize("case", sorted(NAMES))
def test_names_in_other_scripts_render_or_say_they_cannot(case: str, tmp_path) -> None:
    charset, name = NAMES[case]
    source = _named(charset, name)
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    source = pydicom.dcmread(path)  # decoded through its own character set, as the gateway reads it
    assert str(source.PatientName) == name
    layout = layout_card(knee_report(sources=(source,), images=(image_result(not_assessed()),)))
    _check(layout)
    shown = name.replace("^", " ")
    [drawn] = [item for item in layout.items if item.text in (shown, NOT_SHOWN)]
    if card_layout.covers(shown, True):
        assert drawn.text == shown and not drawn.cjk
    elif card_layout.find_cjk_font() is not None:
        assert drawn.text == shown and drawn.cjk
    else:
        assert drawn.text == NOT_SHOWN  # a plain statement, never boxes or mojibake
    assert "\ufffd" not in layout.text()


def test_covariates_only_result_draws_no_analysed_regions() -> None:
    study = assessed("osteopenia", {}, ("age", "sex", "weight", "height"), -2.26, (-2.8, -1.8))
    report = knee_report(study=study, covariates=COVARIATES)
    text = layout_card(report).text()
    flat = " ".join(text.split())
    assert "the radiograph was not used" in flat
    assert "regions the model analysed" not in flat
    assert "not used:" in flat
    with_image = " ".join(layout_card(knee_report()).text().split())
    assert "regions the model analysed" in with_image
