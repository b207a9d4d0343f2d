"""Patient covariates from the DICOM header: age, sex, weight, height (shared by serving and training).

Contract (issue #8 fills in the parsing): ``covariates_from_dataset(ds)`` reads PatientAge (every AS
form: ``065Y``, ``780M``, ``052W``, ``010D``), else PatientBirthDate with StudyDate / AcquisitionDate
/ ContentDate; PatientSex (M/F; O or blank = unknown); PatientWeight (kg); PatientSize (m; a value
that is plainly centimetres is converted and noted). Implausible values count as missing and the
reason goes into ``notes``. ``covariates_from_values`` applies the same rules to a training
manifest's columns. These values are patient data: they go to SQL, the SR and the result card,
never to logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from osteogate.model.taxonomy import COVARIATES


@dataclass(frozen=True)
class Covariates:
    age_years: float | None = None
    sex: str | None = None  # "F" or "M"
    weight_kg: float | None = None
    height_m: float | None = None
    # Why a value was converted or dropped, e.g. "PatientSize 165 read as centimetres".
    notes: tuple[str, ...] = ()

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
