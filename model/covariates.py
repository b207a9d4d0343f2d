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

from dataclasses import dataclass, replace
from typing import Any

from osteogate.model.header_values import (  # noqa: F401 - re-exported: the parsers' public home was here
    AGE_MAX_YEARS,
    BMI_RANGE,
    HEIGHT_CM_RANGE,
    HEIGHT_M_RANGE,
    WEIGHT_KG_RANGE,
    _text,
    age_from_dates,
    completed_years,
    parse_age,
    parse_date,
    parse_height,
    parse_sex,
    parse_weight,
)
from osteogate.model.taxonomy import COVARIATES

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
