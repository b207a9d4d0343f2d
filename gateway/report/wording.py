"""What the SR, the result card and ``show`` say, worded once: rounding, headlines, the plain-language
summary, inputs, laterality, image order, and the header hygiene both DICOM builders rely on.

Everything here is pure (no I/O) so the SR (gateway/report/sr.py) and the result card
(gateway/report/card.py) cannot drift apart: a radiologist who reads "osteopenia 72 %" on the card
reads the same number in the SR.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

from osteogate.model.assessment import Assessment, StudyAssessment
from osteogate.model.covariates import Covariates
from osteogate.model.taxonomy import CLASSES, LOW_BMD_CLASSES
from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import STR_VR, validate_value

DISCLAIMER = (
    "Screening aid, not a diagnosis: it cannot rule out low bone density; confirm with DXA. "
    "Not cleared for clinical use."
)
SHORT_DISCLAIMER = "Screening aid, not a diagnosis. Not cleared for clinical use."

INPUT_LABELS: dict[str, str] = {"image": "image", "age": "age", "sex": "sex", "weight": "weight", "height": "height"}
SEX_WORDS = {"F": "female", "M": "male"}


# -- numbers -------------------------------------------------------------------------------------


def percentages(probabilities: Mapping[str, float]) -> dict[str, int]:
    """Whole percentages that add up to 100 (largest-remainder rounding), in CLASSES order.

    Calibrated probabilities do not support more than whole percent, and a card whose three bars
    read 33 + 33 + 33 looks broken; each value is its exact percentage rounded down or up.
    """
    values = {name: max(0.0, float(probabilities.get(name, 0.0))) for name in CLASSES}
    total = sum(values.values())
    if total <= 0 or not math.isfinite(total):
        return {name: 0 for name in CLASSES}
    exact = {name: 100.0 * value / total for name, value in values.items()}
    floors = {name: math.floor(value) for name, value in exact.items()}
    short = 100 - sum(floors.values())
    # Ties broken by class order, so the result is deterministic.
    by_remainder = sorted(CLASSES, key=lambda n: (-(exact[n] - floors[n]), CLASSES.index(n)))
    for name in by_remainder[:short]:
        floors[name] += 1
    return floors


def low_bmd_percent(probabilities: Mapping[str, float]) -> int:
    rounded = percentages(probabilities)
    return sum(rounded[name] for name in LOW_BMD_CLASSES)


def fmt_t_score(value: float) -> str:
    # A typographic minus would not survive every PACS font; one decimal is the precision DXA uses.
    return f"{value:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0")


def t_score_text(assessment: Assessment) -> str | None:
    if assessment.t_score is None:
        return None
    text = f"Estimated T-score {fmt_t_score(assessment.t_score)}"
    if assessment.t_score_interval is not None:
        low, high = assessment.t_score_interval
        text += f" (80 % prediction interval {fmt_t_score(low)} to {fmt_t_score(high)})"
    return text


# -- words -----------------------------------------------------------------------------------------


def headline(assessment: Assessment) -> str:
    """The few words a radiologist reads first (card banner, SR summary's first clause)."""
    if not assessment.assessed:
        return "Not assessed"
    if assessment.label == "osteoporosis":
        return "Low bone density likely: osteoporosis range"
    if assessment.label == "osteopenia":
        return "Low bone density likely: osteopenia range"
    # "Not detected", never "normal bone": a screening aid cannot rule low bone density out.
    return "Low bone density not detected"


def low_bmd_threshold(assessment: Assessment) -> float | None:
    """The screening operating point behind a label: P(osteopenia) + P(osteoporosis) at or above it
    flags low bone density (from the card's grouped validation, via Assessment.validation)."""
    points = assessment.validation.get("operating_points") if assessment.validation else None
    try:
        value = float(points["low_bmd"]["threshold"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and 0 < value < 1 else None


def below_threshold_phrase(assessment: Assessment) -> str | None:
    """Why a result is "not detected" although low bone density may still be probable, e.g.
    "low bone density 62 %, below the screening threshold of 76 %". A "normal 38 %" alone would
    hide that most of the probability is on the low-BMD side."""
    if assessment.probabilities is None:
        return None
    text = f"low bone density {low_bmd_percent(assessment.probabilities)} %"
    threshold = low_bmd_threshold(assessment)
    if threshold is not None:
        text += f", below the screening threshold of {round(100 * threshold)} %"
    return text


def result_phrase(assessment: Assessment) -> str:
    """One result in a few words with its number, e.g. "osteopenia 72 %" or "not assessed: <reason>"."""
    if not assessment.assessed:
        return f"not assessed: {assessment.reason}"
    label = str(assessment.label)
    if assessment.probabilities is None:
        return label
    if label not in LOW_BMD_CLASSES:
        below = below_threshold_phrase(assessment)
        return f"{label} ({below})" if below else label
    return f"{label} {percentages(assessment.probabilities)[label]} %"


def inputs_phrase(assessment: Assessment) -> str:
    used = ", ".join(INPUT_LABELS.get(n, n) for n in assessment.inputs_used) or "none"
    text = f"Inputs used: {used}"
    if assessment.inputs_missing:
        text += f"; missing: {', '.join(INPUT_LABELS.get(n, n) for n in assessment.inputs_missing)}"
    return text


_VALIDATION_NAMES = {
    "auc_low_bmd": "low-BMD AUC",
    "auc_osteoporosis": "osteoporosis AUC",
    "sensitivity_low_bmd": "low-BMD sensitivity",
    "specificity_low_bmd": "low-BMD specificity",
    "t_score_mae": "T-score MAE",
    "pi80_coverage": "80 % PI coverage",
    "n_images": "images",
}


def _figure(value: Any) -> str | None:
    if isinstance(value, Mapping):
        try:
            text = f"{float(value['value']):.2f}"
        except (KeyError, TypeError, ValueError):
            return None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            text += f" (95 % CI {float(value['ci_low']):.2f}-{float(value['ci_high']):.2f})"
        return text
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        return None
    return f"{value}" if isinstance(value, int) else f"{float(value):.2f}"


def validation_text(assessment: Assessment) -> str | None:
    """The grouped-validation figures that back a result, in words (SR comment, card footer)."""
    parts = []
    for key, name in _VALIDATION_NAMES.items():
        figure = _figure(assessment.validation.get(key)) if assessment.validation else None
        if figure is not None:
            parts.append(f"{name} {figure}")
    if not parts:
        return None
    where = assessment.validation.get("evaluated_on")
    return "Validation (grouped cross-validation" + (f", {where}" if isinstance(where, str) else "") + "): " + \
        "; ".join(parts)


def notes(assessment: Assessment, covariates: Covariates | None = None) -> tuple[str, ...]:
    """What a reader should know about the inputs (values converted or dropped, inputs left out)."""
    return tuple(assessment.notes) or (tuple(covariates.notes) if covariates is not None else ())


def covariate_values(covariates: Covariates) -> dict[str, str]:
    """Display values of the covariates that are present (patient data: SR, card, show; never logs)."""
    values: dict[str, str] = {}
    if covariates.age_years is not None:
        values["age"] = f"{covariates.age_years:.0f} y"
    if covariates.sex is not None:
        values["sex"] = SEX_WORDS.get(covariates.sex, covariates.sex)
    if covariates.weight_kg is not None:
        values["weight"] = f"{covariates.weight_kg:.0f} kg"
    if covariates.height_m is not None:
        values["height"] = f"{covariates.height_m:.2f} m"
    return values


def summary_text(study: StudyAssessment) -> str:
    """The plain-language summary at the top of the SR (and the card's headline block)."""
    result = study.study
    if not result.assessed:
        sentence = f"Not assessed: {result.reason}."
    else:
        sentence = headline(result)
        if result.probabilities is not None:
            rounded = percentages(result.probabilities)
            label = str(result.label)
            if label in LOW_BMD_CLASSES:
                detail = f"{label} {rounded[label]} %; osteopenia or osteoporosis {low_bmd_percent(result.probabilities)} %"
            else:
                detail = below_threshold_phrase(result) or label
            sentence += f" ({detail})"
        sentence += "."
    parts = [sentence]
    t_text = t_score_text(result)
    if t_text:
        parts.append(t_text + ".")
    parts.append(inputs_phrase(result) + ".")
    parts.append(SHORT_DISCLAIMER)
    return " ".join(parts)


# -- images --------------------------------------------------------------------------------------


def _int_or_none(value: Any) -> int | None:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number


def laterality(header: Dataset) -> str | None:
    """"R", "L" or "B" when the header says so (ImageLaterality, else the series' Laterality).

    Never guessed: ViewPosition (AP, PA, LAT...) names a projection, not a side, and free-text
    descriptions are not trusted for a side. "U" (unpaired) and anything else give None.
    """
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(_safe_get(header, keyword) or "").strip().upper()
        if value in ("R", "L", "B"):
            return value
    return None


SIDE_WORDS = {"R": "right", "L": "left", "B": "both sides"}


def _safe_get(ds: Dataset, keyword: str) -> Any:
    """``ds.get`` that survives values pydicom cannot convert (a malformed IS, DS or date)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.get(keyword)
    except Exception:  # noqa: BLE001 - any conversion failure means "not usable"
        return None


# -- header hygiene ----------------------------------------------------------------------------

# Modules copied into our objects from the source: dropping a malformed value (Type 2 -> empty) is
# better than an invalid object a PACS refuses, or a study that never gets a report.
_TYPE2_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_ENUMERATED = {"PatientSex": {"M", "F", "O"}}


# Control characters: none in short strings (ESC only, for ISO 2022 code extensions); text VRs may also
# hold TAB, LF, FF and CR. Trailing NULs are padding.
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_CONTROL_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_TEXT_VRS = ("LT", "ST", "UT")


def _vm_ok(element: Any, count: int) -> bool:
    try:
        vm = dictionary_VM(element.tag)
    except KeyError:
        return True
    if vm == "1":
        return count <= 1
    if vm.isdigit():
        return count in (0, int(vm))
    return True


def _valid(element: Any) -> bool:
    if element.VR in ("SQ", "UN", "OB", "OW", "OF", "OD", "OL", "OV"):
        return element.VR == "SQ"
    value = element.value
    values = list(value) if isinstance(value, MultiValue) else [value]
    if not _vm_ok(element, len(values)):
        return False
    for item in values:
        if item is None or item == "":
            continue
        # Converted values (DSfloat, IS, PersonName, DA...) are checked as the text they encode to.
        validate_value(element.VR, str(item) if element.VR in STR_VR else item, pydicom_config.RAISE)
        pattern = _CONTROL_TEXT if element.VR in _TEXT_VRS else _CONTROL
        if element.VR in STR_VR and pattern.search(str(item).rstrip("\x00")):
            return False
        if element.VR == "PN":  # at most 3 component groups of at most 5 components (PS3.5 6.2.1)
            groups = str(item).split("=")
            if len(groups) > 3 or any(group.count("^") > 4 for group in groups):
                return False
    allowed = _ENUMERATED.get(element.keyword)
    return not (allowed and any(str(v) not in allowed for v in values if v not in (None, "")))


def clean_dataset(source: Dataset, *, depth: int = 0) -> Dataset:
    """A copy of ``source`` without pixel data, file meta, private or malformed elements.

    Every value is checked against its VR (pydicom's validators) and a few enumerated values; what
    fails is left out. Sequences are cleaned item by item (depth-limited).
    """
    clean = Dataset()
    for tag in list(source.keys()):
        if tag.group in (0x0002, 0x7FE0) or (0x6000 <= tag.group <= 0x60FF) or tag.is_private:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                element = source[tag]
                if not _valid(element):
                    continue
                if element.VR == "SQ":
                    if depth >= 4:
                        continue
                    items = [clean_dataset(item, depth=depth + 1) for item in element.value]
                    clean.add_new(tag, "SQ", DicomSequence(items))
                    continue
                clean.add(element)
        except Exception:  # noqa: BLE001 - a value pydicom cannot even convert is malformed
            continue
    return clean


def _known_charset(value: Any) -> bool:
    values = [str(v) for v in (value if isinstance(value, MultiValue) else [value])]
    # The first value may be empty (the default repertoire) when code extensions follow it.
    return any(values) and all(v in python_encoding or (i == 0 and v == "") for i, v in enumerate(values))


def _non_ascii(ds: Dataset) -> bool:
    for element in ds:
        if element.VR == "SQ":
            if any(_non_ascii(item) for item in element.value):
                return True
        elif element.VR in STR_VR and not str(element.value).isascii():
            return True
    return False


def ensure_charset(ds: Dataset) -> None:
    """UTF-8 (ISO_IR 192) when any text is not ASCII: the values are Python strings, and a reason or
    a note from the model may hold characters the source's character set cannot write."""
    if _non_ascii(ds) and ds.get("SpecificCharacterSet") != "ISO_IR 192":
        ds.SpecificCharacterSet = "ISO_IR 192"


def evidence_header(source: Dataset) -> Dataset:
    """Header of a source image fit to be copied into our SR / card: cleaned, Type 2 filled.

    Text values are decoded strings by now, so the character set only has to be able to write them:
    the source's when pydicom knows it, else UTF-8 (ISO_IR 192) when anything is not ASCII.
    """
    header = clean_dataset(source)
    charset = header.get("SpecificCharacterSet")
    if charset is not None and not _known_charset(charset):
        del header.SpecificCharacterSet
    if "SpecificCharacterSet" not in header and _non_ascii(header):
        header.SpecificCharacterSet = "ISO_IR 192"
    # An empty Manufacturer would become an empty Type 1 value in our Contributing Equipment.
    if "Manufacturer" in header and not str(header.Manufacturer or "").strip():
        del header.Manufacturer
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def text_value(header: Dataset, keyword: str, limit: int = 64) -> str:
    """A printable single-line value (card text), or "" when absent or unreadable."""
    value = _safe_get(header, keyword)
    if value is None:
        return ""
    text = " ".join(str(value).split())
    return text[:limit]
