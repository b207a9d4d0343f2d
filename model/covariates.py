"""Patient covariates from the DICOM header: age, sex, weight, height (shared by serving and training).

Contract (issue #8): ``covariates_from_dataset(ds)`` reads PatientAge (every AS form: ``065Y``,
``780M``, ``052W``, ``010D``), else PatientBirthDate with StudyDate / AcquisitionDate / ContentDate;
PatientSex (M/F; O or blank = unknown); PatientWeight (kg); PatientSize (m; a value that is plainly
centimetres is converted and noted). Implausible values count as missing and the reason goes into
``notes``. ``covariates_from_values`` applies the same rules to a training manifest's columns.
These values are patient data: they go to SQL, the SR and the result card, never to logs.

Neither function ever raises on a bad header value: a header is written by a modality we do not
control, and one malformed attribute must cost that input, not the study. No torch, no numpy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from osteogate.model.taxonomy import COVARIATES

# Plausibility limits (adults and children; anything outside is a unit or typing error).
AGE_MAX_YEARS = 120.0
WEIGHT_KG_RANGE = (2.0, 350.0)
HEIGHT_M_RANGE = (0.4, 2.5)
# PatientSize is metres by the standard; 40-250 can only be centimetres (nobody is 40 m tall).
HEIGHT_CM_RANGE = (40.0, 250.0)
BMI_RANGE = (10.0, 80.0)

# DICOM AS: nnnD, nnnW, nnnM or nnnY. Modalities also write "65Y", "65 Y", "65" (years): accepted.
_AGE_PATTERN = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}
_DATE_ATTRIBUTES = ("StudyDate", "AcquisitionDate", "ContentDate")


@dataclass(frozen=True)
class Covariates:
    """The header covariates of a study (None = missing), with the notes a reader needs.


    """
    age_years: float | None = None
    sex: str | None = None  # "F" or "M"
    weight_kg: float | None = None
    height_m: float | None = None
    # Why a value was converted or dropped, e.g. "PatientSize 165 read as centimetres".
    notes: tuple[str, ...] = ()
    # A second source for the age (years, how it was derived): the birth and study dates when they
    # give another age than PatientAge. Used only when PatientAge is out of the validated range.
    age_fallback: tuple[float, str] | None = None

    @property
    def bmi(self) -> float | None:
        if self.weight_kg is None or self.height_m is None:
            return None
        return self.weight_kg / (self.height_m**2)

    @property
    def present(self) -> tuple[str, ...]:
        values = {"age": self.age_years, "sex": self.sex, "weight": self.weight_kg, "height": self.height_m}
        return tuple(name for name in COVARIATES if values[name] is not None)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(name for name in COVARIATES if name not in self.present)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (SQL JSON column, model inputs, tests)."""
        return {"age_years": self.age_years, "sex": self.sex, "weight_kg": self.weight_kg,
                "height_m": self.height_m, "bmi": self.bmi, "notes": list(self.notes)}


# ---------------------------------------------------------------------------------- parsing helpers


def _text(value: Any) -> str:
    """A header value as stripped text; multi-values and bytes are reduced to their first item."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip().strip("\x00").strip()


def _number(value: Any) -> float | None:
    """A finite float from a DS/IS/number/text, or None (decimal comma accepted: '72,5')."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = _text(value).replace(",", ".")
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def parse_age(value: Any) -> tuple[float | None, str | None]:
    """(age in years, note) from a DICOM AS string (or a plain number of years).

    Returns (None, reason) for malformed or implausible values and (None, None) for blank.

    Parameters
    ----------
    value : Any
        A PatientAge value (AS).

    Returns
    -------
    tuple of (float or None, str or None)
    """
    if value is None or isinstance(value, bool):
        return None, None
    if isinstance(value, int | float):
        years = float(value)
        if not math.isfinite(years):
            return None, "age is not a finite number"
        raw, unit = f"{value}", "Y"
    else:
        raw = _text(value)
        if not raw:
            return None, None
        match = _AGE_PATTERN.match(raw)
        if match is None:
            number = _number(raw)  # "65.5" from a spreadsheet: years
            if number is None:
                return None, f"age {raw!r} is not a DICOM age string"
            years, unit = number, "Y"
        else:
            unit = (match.group(2) or "Y").upper()
            years = int(match.group(1)) * _DAYS_PER_UNIT[unit] / 365.25
    if years < 0 or years > AGE_MAX_YEARS:
        return None, f"age {raw} is implausible (outside 0-{AGE_MAX_YEARS:.0f} years)"
    if years == 0:
        # Several modalities write 000Y when the age is unknown; a newborn is out of scope anyway.
        return None, f"age {raw} read as unknown"
    return round(years, 3), None


def parse_date(value: Any) -> date | None:
    """A DICOM DA (YYYYMMDD, also the old YYYY.MM.DD form) or a date object; None if malformed.

    Parameters
    ----------
    value : Any
        A DA value.

    Returns
    -------
    datetime.date or None
    """
    if isinstance(value, date):
        return value
    text = _text(value)
    match = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", text)
    if match is None:
        return None
    try:
        return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None


def completed_years(birth: date, on: date) -> int:
    """Age in completed years on ``on`` (how PatientAge is written: a birthday not yet reached
    this year does not count).

    Parameters
    ----------
    birth : datetime.date
        Birth date.
    on : datetime.date
        Reference date.

    Returns
    -------
    int
    """
    years = on.year - birth.year
    if (on.month, on.day) < (birth.month, birth.day):
        years -= 1
    return years


def age_from_dates(birth_value: Any, reference_values: list[tuple[str, Any]]) -> tuple[float | None, list[str]]:
    """(age in years, notes) from a birth date and the first usable (name, date) reference.

    Parameters
    ----------
    birth_value : Any
        PatientBirthDate.
    reference_values : list
        (name, value) of the reference dates, in order of preference.

    Returns
    -------
    tuple of (float or None, list of str)
        The age and the notes (the last says how it was derived).
    """
    notes: list[str] = []
    birth_text = _text(birth_value)
    if not birth_text and not isinstance(birth_value, date):
        return None, notes
    birth = parse_date(birth_value)
    if birth is None:
        return None, [f"PatientBirthDate {birth_text!r} is not a DICOM date (YYYYMMDD): age unknown"]
    for name, value in reference_values:
        reference = parse_date(value)
        if reference is None:
            if _text(value):
                notes.append(f"{name} {_text(value)!r} is not a DICOM date: not used for the age")
            continue
        years = completed_years(birth, reference)
        if years <= 0 or years > AGE_MAX_YEARS:
            return None, [*notes, f"age {years} from PatientBirthDate and {name} is implausible"]
        return float(years), [*notes, f"age from PatientBirthDate and {name}"]
    return None, [*notes, "PatientBirthDate present but no usable study, acquisition or content date"]


def parse_sex(value: Any) -> tuple[str | None, str | None]:
    """parse_sex

    Parameters
    ----------
    value : Any
        PatientSex.

    Returns
    -------
    tuple of (str or None, str or None)
    """
    text = _text(value).upper()
    if text in ("M", "F"):
        return text, None
    if text in ("", "O"):
        return None, None
    if text in ("MALE", "FEMALE"):
        return text[0], None
    return None, f"sex {text[:16]!r} is not M, F or O: unknown"


def parse_weight(value: Any) -> tuple[float | None, str | None]:
    """parse_weight

    Parameters
    ----------
    value : Any
        PatientWeight (kg).

    Returns
    -------
    tuple of (float or None, str or None)
    """
    raw = _text(value) if not isinstance(value, int | float) else str(value)
    if not raw:
        return None, None
    weight = _number(value)
    if weight is None:
        return None, f"weight {raw[:16]!r} is not a number"
    low, high = WEIGHT_KG_RANGE
    if weight <= 0:
        return None, f"weight {raw} kg is zero or negative: unknown"
    if not low <= weight <= high:
        return None, f"weight {raw} kg is implausible (outside {low:g}-{high:g} kg)"
    return round(weight, 3), None


def parse_height(value: Any) -> tuple[float | None, str | None]:
    """(metres, note). A value that can only be centimetres (40-250) is converted and noted.

    Parameters
    ----------
    value : Any
        PatientSize (m; centimetres are converted).

    Returns
    -------
    tuple of (float or None, str or None)
    """
    raw = _text(value) if not isinstance(value, int | float) else str(value)
    if not raw:
        return None, None
    height = _number(value)
    if height is None:
        return None, f"height {raw[:16]!r} is not a number"
    if height <= 0:
        return None, f"height {raw} m is zero or negative: unknown"
    low, high = HEIGHT_M_RANGE
    if low <= height <= high:
        return round(height, 4), None
    cm_low, cm_high = HEIGHT_CM_RANGE
    if cm_low <= height <= cm_high:
        return round(height / 100.0, 4), f"height {raw} read as centimetres ({height / 100.0:g} m)"
    return None, f"height {raw} m is implausible (outside {low:g}-{high:g} m)"


def _assemble(age: float | None, sex: str | None, weight: float | None, height: float | None,
              notes: list[str]) -> Covariates:
    if weight is not None and height is not None:
        bmi = weight / height**2
        low, high = BMI_RANGE
        if not low <= bmi <= high:
            # Which of the two is wrong cannot be told: both are dropped.
            notes.append(f"BMI {bmi:.1f} from weight and height is implausible (outside {low:g}-{high:g}): "
                         "weight and height unknown")
            weight = height = None
    return Covariates(age_years=age, sex=sex, weight_kg=weight, height_m=height, notes=tuple(notes))


# ---------------------------------------------------------------------------------- public API


def _get(ds: Any, keyword: str) -> Any:
    """A header value by keyword, or None; never raises.

    pydicom converts values lazily on access, and depending on its validation settings a malformed
    DS/IS/AS/DA raises there; the raw bytes are then read instead so the note can say what was wrong."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - any conversion failure: fall back to the raw element
        pass
    try:
        value = getattr(ds.get_item(keyword), "value", None)
    except Exception:  # noqa: BLE001
        return None
    return value.decode("ascii", errors="replace") if isinstance(value, bytes) else value


def covariates_from_dataset(ds: Any) -> Covariates:
    """Covariates from a pydicom Dataset (header only; pixel data is never touched).

    Parameters
    ----------
    ds : pydicom.Dataset
        A header.

    Returns
    -------
    Covariates
    """
    notes: list[str] = []
    age, note = parse_age(_get(ds, "PatientAge"))
    if note:
        notes.append(f"PatientAge: {note}")
    birth = _get(ds, "PatientBirthDate")
    dates = [(name, _get(ds, name)) for name in _DATE_ATTRIBUTES]
    second: tuple[float, str] | None = None
    if age is None:
        from_dates, date_notes = age_from_dates(birth, dates)
        notes.extend(date_notes)
        age = from_dates
    elif _text(birth):
        # The second source, kept for model/scoring.py: a PatientAge outside the validated range
        # (e.g. 120Y for a 40-year-old) falls back to the birth and study dates when those are usable.
        from_dates, date_notes = age_from_dates(birth, dates)
        if from_dates is not None and from_dates != age:
            second = (from_dates, date_notes[-1])
    sex, note = parse_sex(_get(ds, "PatientSex"))
    if note:
        notes.append(f"PatientSex: {note}")
    weight, note = parse_weight(_get(ds, "PatientWeight"))
    if note:
        notes.append(f"PatientWeight: {note}")
    height, note = parse_height(_get(ds, "PatientSize"))
    if note:
        notes.append(f"PatientSize: {note}")
    covariates = _assemble(age, sex, weight, height, notes)
    return replace(covariates, age_fallback=second) if second else covariates


def covariates_from_values(age: Any = None, sex: Any = None, weight_kg: Any = None, height_m: Any = None,
                           birth_date: Any = None, reference_date: Any = None) -> Covariates:
    """The same rules for plain values (a training manifest's columns: any may be empty).

    ``age`` is years or a DICOM AS string; without it, ``birth_date`` and ``reference_date``
    (DICOM DA strings or dates) give the age in completed years.

    Parameters
    ----------
    age, sex, weight_kg, height_m : Any
        Raw values (as in a header).
    notes : Sequence[str]
        Notes to carry.

    Returns
    -------
    Covariates
    """
    notes: list[str] = []
    years, note = parse_age(age)
    if note:
        notes.append(note)
    if years is None and birth_date is not None:
        years, date_notes = age_from_dates(birth_date, [("reference date", reference_date)])
        notes.extend(date_notes)
    parsed_sex, note = parse_sex(sex)
    if note:
        notes.append(note)
    weight, note = parse_weight(weight_kg)
    if note:
        notes.append(note)
    height, note = parse_height(height_m)
    if note:
        notes.append(note)
    return _assemble(years, parsed_sex, weight, height, notes)
