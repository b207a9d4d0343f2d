"""Parsing one header value into a covariate (PatientAge, PatientBirthDate with a reference date,
PatientSex, PatientWeight, PatientSize): each returns the value or None with the reason. Split out
of model/covariates.py, which assembles them into ``Covariates``."""

from __future__ import annotations

import math
import re
from datetime import date
from typing import Any

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
