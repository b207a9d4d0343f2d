"""OsteoGate result report: a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

Built from a ``model.assessment.StudyAssessment`` (what the model reports, never more than its card
has shown) and the headers of the source images. Content tree (codes in brackets)::

    CONTAINER Imaging Measurement Report (DCM 126000)                      TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name /
                       Manufacturer / Model Name                           TID 1001/1004
      HAS CONCEPT MOD  Procedure reported = Radiographic imaging procedure (SCT 363680008)
      CONTAINS TEXT    Summary (DCM 121111) = "Low bone density likely: osteopenia range
                       (osteopenia 72 %; ...). Estimated T-score ... Inputs used: ...
                       Screening aid, not a diagnosis. Not cleared for clinical use."
      CONTAINS         Image Library: one entry per source image with the needed attributes
      CONTAINS         Imaging Measurements (DCM 126010)
        Measurement Group "study result" (no IMAGE item: applies to every image)  TID 1501
          Tracking Identifier / Tracking Unique Identifier
          Finding Site (SCT 363698007) = Knee | Spine | Lumbar spine ... (+ laterality when
                        every image agrees: Right | Left | Right and left)
          Algorithm Name / Version / Parameters ("checkpoint_sha256=...")   TID 4019
          [assessed] NUM Probability (DCM 122157) [UCUM %], one per class, each with
                HAS CONCEPT MOD Associated finding (SCT 246090004) = Normal (SCT 17621005) |
                Osteopenia (SCT 312894000) | Osteoporosis (SCT 64859006)
          [assessed, when estimated] NUM Estimated T-score (99OSTEOGATE T-SCORE-EST) [UCUM {T-score}]
                HAS PROPERTIES +/- range of upper / lower measurement uncertainty (SCT 371886008 /
                371885007): the 80 % prediction interval                     TID 310
          [inputs used] NUM Subject Age (DCM 121033) [UCUM a], CODE Subject Sex (DCM 121032) =
                Female | Male (DCM F | M), NUM Body weight (LN 29463-7) [UCUM kg],
                NUM Body height (LN 8302-2) [UCUM m]
          [assessed] CODE Osteoporosis = Detected | Not detected (SCT 260373001 | 260415000)
                     CODE Osteopenia   = Detected | Not detected
          TEXT Comment (DCM 121106) = "Not assessed: <reason>" (when not assessed),
                "Inputs used: image, age; missing: weight, height", covariate notes,
                the T-score interval in words
        Measurement Group "image N (knee, right)" per scored image, same items (no covariate
          values), plus IMAGE Source of Measurement
      CONTAINS         Qualitative Evaluations (UMLS C0034375)              TID 1500 row 12
        TEXT Comment (DCM 121106) = screening disclaimer
        TEXT Comment (DCM 121106) = "Image not classified: <reason>" per skipped image

Why "Probability + Associated finding" rather than one concept name per class: DICOM has no
standard per-class probability codes for bone density, and a private scheme would be opaque
to PACS viewers. The generic Probability concept qualified by a standard SNOMED CT finding
keeps every code standard. Probabilities are whole percentages (UCUM "%") that add up to 100:
calibration does not support more digits, and "72 %" is what a reader expects.

Why a private code for the T-score: PS3.16 has no T-score concept, and the LOINC T-score codes
(e.g. 80946-7 "DXA Hip-L T-score BMD") name a DXA measurement at a site, which this estimate from
a radiograph is not; claiming one would over-state what was done. The private scheme is declared
in CodingSchemeIdentificationSequence.

Nothing that is "not assessed" carries a probability, a T-score or a Detected / Not detected
evaluation: the group says "Not assessed: <reason>" instead (issue #8 item 7).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.templates import Template
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.wording import DISCLAIMER
from osteogate.gateway.work.outcome import image_order_key
from osteogate.model.assessment import Assessment, ImageAssessment, StudyAssessment
from osteogate.model.covariates import Covariates
from osteogate.model.taxonomy import CLASSES, REGIONS
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

__all__ = [
    "AlgorithmInfo",
    "ReportedImage",
    "SkippedImage",
    "StudyReport",
    "ClassProbability",
    "QualitativeEvaluationsContainer",
    "DISCLAIMER",
    "SERIES_DESCRIPTION",
    "SERIES_NUMBER",
    "build_result_sr",
    "read_result",
    "sr_summary",
]

SERIES_DESCRIPTION = "OsteoGate bone density screening"
SERIES_NUMBER = 9901

# --- codes --------------------------------------------------------------------------------
PROBABILITY = codes.DCM.Probability  # DCM 122157 "Probability"
PERCENT = Code("%", "UCUM", "%")
ASSOCIATED_FINDING = Code("246090004", "SCT", "Associated finding")
OSTEOPOROSIS = Code("64859006", "SCT", "Osteoporosis")
OSTEOPENIA = Code("312894000", "SCT", "Osteopenia")
NORMAL = Code("17621005", "SCT", "Normal")
CLASS_CODES: dict[str, Code] = {"normal": NORMAL, "osteopenia": OSTEOPENIA, "osteoporosis": OSTEOPOROSIS}
# "Detected / Not detected" rather than "Present / Absent": a screening aid can say what it found,
# but must not claim that low bone density is absent.
PRESENT = Code("260373001", "SCT", "Detected")
ABSENT = Code("260415000", "SCT", "Not detected")
COMMENT = codes.DCM.Comment  # DCM 121106
SUMMARY = codes.DCM.Summary  # DCM 121111, a CID 7001 report heading
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
RADIOGRAPHY_PROCEDURE = Code("363680008", "SCT", "Radiographic imaging procedure")
KNEE = Code("72696002", "SCT", "Knee")
SPINE = Code("421060004", "SCT", "Spine")
# BodyPartExamined defined terms (PS3.16 Annex L) that name a spine segment: reporting the
# segment when the modality said so is more precise than the generic "Spine".
SPINE_SEGMENTS: dict[str, Code] = {
    "CSPINE": Code("122494005", "SCT", "Cervical spine"),
    "TSPINE": Code("122495006", "SCT", "Thoracic spine"),
    "LSPINE": Code("122496007", "SCT", "Lumbar spine"),
}
LATERALITY: dict[str, Code] = {
    "R": Code("24028007", "SCT", "Right"),
    "L": Code("7771000", "SCT", "Left"),
    "B": Code("51440002", "SCT", "Right and left"),
}
# Inputs (issue #8 item 6): standard concepts and UCUM units.
SUBJECT_AGE = codes.DCM.SubjectAge  # DCM 121033, CID 7456 units
SUBJECT_SEX = codes.DCM.SubjectSex  # DCM 121032, CID 7455 values
SEX_CODES: dict[str, Code] = {"F": codes.DCM.Female, "M": codes.DCM.Male}
BODY_WEIGHT = Code("29463-7", "LN", "Body weight")
BODY_HEIGHT = Code("8302-2", "LN", "Body height")
YEARS = Code("a", "UCUM", "year")
KILOGRAMS = Code("kg", "UCUM", "kg")
METRES = Code("m", "UCUM", "m")
# Private: see the module docstring.
PRIVATE_SCHEME = "99OSTEOGATE"
T_SCORE = Code("T-SCORE-EST", PRIVATE_SCHEME, "Estimated T-score")
T_SCORE_UNIT = Code("{T-score}", "UCUM", "T-score")

_STUDY_TRACKING_ID = "study result"
_NOT_ASSESSED_PREFIX = "Not assessed: "
_SKIPPED_PREFIX = "Image not classified: "


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str  # e.g. "OsteoGate EfficientNet-B0" or "UNTRAINED OsteoGate ..." (card.display_name)
    version: str  # card version
    checkpoint_sha256: str
    manufacturer: str = "OsteoGate"


@dataclass(frozen=True)
class ReportedImage:
    """A source image the model scored (or declined to assess), with its header."""

    source: pydicom.Dataset  # header of the source image (no pixel data needed)
    result: ImageAssessment


@dataclass(frozen=True)
class SkippedImage:
    source: pydicom.Dataset
    reason: str  # e.g. "region unknown", "out of scope: CHEST"


@dataclass(frozen=True)
class StudyReport:
    """Everything one report version is made from: the SR and the result card read the same."""

    assessment: StudyAssessment
    sources: tuple[pydicom.Dataset, ...]  # headers aligned with assessment.images
    algorithm: AlgorithmInfo
    skipped: tuple[SkippedImage, ...] = ()
    # Small uint8 copies of the source images for the result card, aligned with ``sources``.
    thumbnails: tuple[Any, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.assessment.images):
            raise ValueError(f"{len(self.sources)} source headers for {len(self.assessment.images)} image results")
        if self.thumbnails and len(self.thumbnails) != len(self.sources):
            raise ValueError("thumbnails must be aligned with sources")

    @property
    def images(self) -> list[tuple[int, ReportedImage, Any]]:
        """(number, image, thumbnail) in stable order: InstanceNumber, then SOPInstanceUID."""
        thumbs = self.thumbnails or (None,) * len(self.sources)
        items = sorted(
            zip(self.sources, self.assessment.images, thumbs, strict=True),
            key=lambda t: image_order_key(t[0]),
        )
        return [(n, ReportedImage(s, r), t) for n, (s, r, t) in enumerate(items, start=1)]


class ClassProbability(hd.sr.Measurement):
    """TID 300 Measurement "Probability" (DCM 122157) in whole percent, qualified by its class.

    The class goes in a HAS CONCEPT MOD "Associated finding" (SCT 246090004) CODE item on the
    NUM, so all three per-class probabilities share one standard concept name.
    """

    def __init__(self, class_name: str, percent: int) -> None:
        if class_name not in CLASS_CODES:
            raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
        if not 0 <= int(percent) <= 100:
            raise ValueError(f"probability of {class_name!r} out of [0, 100] %: {percent}")
        super().__init__(name=PROBABILITY, value=int(percent), unit=PERCENT)
        num_item = self[0]
        # Whole percent written as such ("72", not "72.0"): what dsr2html and viewers print.
        num_item.MeasuredValueSequence[0].NumericValue = str(int(percent))
        if "ContentSequence" not in num_item:
            num_item.ContentSequence = hd.sr.ContentSequence()
        num_item.ContentSequence.append(
            hd.sr.CodeContentItem(
                name=ASSOCIATED_FINDING,
                value=CLASS_CODES[class_name],
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )


class QualitativeEvaluationsContainer(Template):
    """TID 1500 rows 12-14: CONTAINER "Qualitative Evaluations" with free TEXT items.

    highdicom's MeasurementReport has no parameter for this container, so it is appended to
    the report's root container after construction.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        super().__init__()
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        container.ContentSequence = hd.sr.ContentSequence([_text(COMMENT, text) for text in texts])
        self.append(container)


# --- builder --------------------------------------------------------------------------------


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _check_assessment(assessment: Assessment, what: str) -> None:
    if not assessment.assessed:
        return
    if assessment.label not in CLASSES:
        raise ValueError(f"{what}: label {assessment.label!r} is not one of {CLASSES}")
    if assessment.probabilities is not None and set(assessment.probabilities) != set(CLASSES):
        raise ValueError(f"{what}: probabilities must have keys {CLASSES}, got {sorted(assessment.probabilities)}")


def _anatomy(region: str, header: pydicom.Dataset | None) -> Code:
    if region == "knee":
        return KNEE
    if region == "spine":
        body_part = str(reporting._safe_get(header, "BodyPartExamined") or "").upper() if header else ""
        return SPINE_SEGMENTS.get(body_part, SPINE)
    raise ValueError(f"region {region!r} is not one of {REGIONS}")


def _study_side(headers: Sequence[pydicom.Dataset]) -> str | None:
    """The study's side only when every image states one: R, L, or B for both; else none."""
    sides = [reporting.laterality(h) for h in headers]
    if not sides or any(s is None for s in sides):
        return None
    if len(set(sides)) == 1:
        return sides[0]
    return "B"


def _evaluations(label: str) -> list[hd.sr.QualitativeEvaluation]:
    """Detected / not detected for the two disease classes, from the (thresholded) label."""
    return [
        hd.sr.QualitativeEvaluation(OSTEOPOROSIS, PRESENT if label == "osteoporosis" else ABSENT),
        hd.sr.QualitativeEvaluation(OSTEOPENIA, PRESENT if label == "osteopenia" else ABSENT),
    ]


def _t_score(assessment: Assessment) -> hd.sr.Measurement:
    properties = None
    if assessment.t_score_interval is not None:
        low, high = assessment.t_score_interval
        properties = hd.sr.MeasurementProperties(
            upper_measurement_uncertainty=round(max(0.0, high - assessment.t_score), 1),  # type: ignore[operator]
            lower_measurement_uncertainty=round(max(0.0, assessment.t_score - low), 1),  # type: ignore[operator]
        )
    return hd.sr.Measurement(
        name=T_SCORE, value=round(float(assessment.t_score), 1), unit=T_SCORE_UNIT,  # type: ignore[arg-type]
        derivation=None, properties=properties,
    )


def _compact(item: pydicom.Dataset) -> None:
    """Write every numeric value of an item tree the way people write it ("58", not "58.0")."""
    for measured in item.get("MeasuredValueSequence", []):
        measured.NumericValue = f"{float(measured.NumericValue):.6g}"
        if "FloatingPointValue" in measured:
            del measured.FloatingPointValue
    for child in item.get("ContentSequence", []):
        _compact(child)


def _covariate_items(assessment: Assessment, covariates: Covariates) -> tuple[list[hd.sr.Measurement], list[Any]]:
    """The covariate values this result used, as standard NUM / CODE items."""
    used = set(assessment.inputs_used)
    measurements: list[hd.sr.Measurement] = []
    codes_: list[Any] = []
    if "age" in used and covariates.age_years is not None:
        measurements.append(hd.sr.Measurement(SUBJECT_AGE, round(covariates.age_years, 1), YEARS))
    if "weight" in used and covariates.weight_kg is not None:
        measurements.append(hd.sr.Measurement(BODY_WEIGHT, round(covariates.weight_kg, 1), KILOGRAMS))
    if "height" in used and covariates.height_m is not None:
        measurements.append(hd.sr.Measurement(BODY_HEIGHT, round(covariates.height_m, 2), METRES))
    if "sex" in used and covariates.sex in SEX_CODES:
        codes_.append(hd.sr.QualitativeEvaluation(SUBJECT_SEX, SEX_CODES[covariates.sex]))
    return measurements, codes_


def _group(
    *,
    identifier: str,
    tracking_uid: str,
    assessment: Assessment,
    algorithm_id: hd.sr.AlgorithmIdentification,
    finding_site: hd.sr.FindingSite,
    covariates: Covariates | None,
    source_images: list[hd.sr.SourceImageForMeasurementGroup] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[Any] = []
    texts: list[str] = []
    if assessment.assessed:
        # The result in words first: SR viewers (dsr2html too) print the class of each probability
        # only in a footnote, so the reader also gets one line that needs no footnote.
        texts.append(f"Result: {reporting.result_phrase(assessment)}")
        if assessment.probabilities is not None:
            rounded = reporting.percentages(assessment.probabilities)
            measurements += [ClassProbability(name, rounded[name]) for name in CLASSES]
            texts[-1] += "; " + ", ".join(f"{name} {rounded[name]} %" for name in CLASSES)
        if assessment.t_score is not None:
            measurements.append(_t_score(assessment))
            t_text = reporting.t_score_text(assessment)
            if t_text and assessment.t_score_interval is not None:
                texts.append(t_text)
    else:
        texts.append(f"{_NOT_ASSESSED_PREFIX}{assessment.reason}")
    if covariates is not None:
        values, sex = _covariate_items(assessment, covariates)
        measurements += values
        evaluations += sex
    texts += list(reporting.notes(assessment, covariates))
    validation = reporting.validation_text(assessment)
    if validation:
        texts.append(validation)
    if assessment.assessed:
        evaluations += _evaluations(str(assessment.label))
    texts.append(reporting.inputs_phrase(assessment))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        algorithm_id=algorithm_id,
        finding_sites=[finding_site],
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=source_images,
    )
    # TID 1501 is extensible; free-text comments go after the coded content.
    group[0].ContentSequence.extend(_text(COMMENT, text) for text in texts)
    return group


def _algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    # TID 4019 has no slot for a hash; "Algorithm Parameters" is free text and travels with
    # every group, so a reader can tell exactly which weights produced the numbers.
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name[:64],
        version=algorithm.version[:64],
        parameters=[f"checkpoint_sha256={algorithm.checkpoint_sha256}"],
        manufacturer=algorithm.manufacturer,
    )


def _tracking_uid(*parts: str) -> str:
    # Deterministic: the same image classified by the same model in a later report version
    # keeps its Tracking Unique Identifier, which is what TID 4108 tracking is for.
    return generate_uid(entropy_srcs=["osteogate-sr", *parts])


def software_version() -> str:
    try:
        return metadata.version("osteogate")
    except metadata.PackageNotFoundError:
        return "unknown"


def _library_headers(headers: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Headers highdicom can describe in the Image Library (it needs Rows/Columns and, for
    projection radiographs, PatientOrientation and ImagerPixelSpacing, which CR may omit)."""
    usable = []
    for header in headers:
        try:
            hd.sr.ImageLibraryEntryDescriptors(header)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):
            continue  # still referenced from its measurement group and the evidence
        usable.append(header)
    return usable


def image_identifier(number: int, region: str, header: pydicom.Dataset) -> str:
    side = reporting.laterality(header)
    return f"image {number} ({region}{', ' + reporting.SIDE_WORDS[side] if side else ''})"


def build_result_sr(
    report: StudyReport,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    predecessor: pydicom.Dataset | None = None,
    device_observer_uid: str | None = None,
    institution_name: str | None = None,
    series_number: int = SERIES_NUMBER,
    content_datetime: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the OsteoGate result SR for one study (see the module docstring for the tree).

    Raises ValueError when there is no image result (TID 1500 needs at least one measurement
    group besides the study's), when images / skipped images / the predecessor span more than one
    study, or on unknown regions or classes.
    """
    assessment = report.assessment
    if not assessment.images:
        raise ValueError("a result SR needs at least one image result")
    headers = [reporting.evidence_header(s) for s in report.sources]
    study_uids = {str(h.StudyInstanceUID) for h in headers}
    study_uids |= {str(s.source.StudyInstanceUID) for s in report.skipped}
    if predecessor is not None:
        study_uids.add(str(predecessor.StudyInstanceUID))
    if len(study_uids) != 1:
        raise ValueError(f"findings belong to {len(study_uids)} different studies; one SR per study")
    _check_assessment(assessment.study, "study")

    algorithm = report.algorithm
    algorithm_id = _algorithm_id(algorithm)
    by_uid = {str(s.SOPInstanceUID): h for s, h in zip(report.sources, headers, strict=True)}
    ordered = report.images
    ordered_headers = [by_uid[str(image.source.SOPInstanceUID)] for _, image, _ in ordered]

    study_side = _study_side(ordered_headers)
    groups = [
        _group(
            identifier=_STUDY_TRACKING_ID,
            tracking_uid=_tracking_uid(str(headers[0].StudyInstanceUID), algorithm.checkpoint_sha256),
            assessment=assessment.study,
            algorithm_id=algorithm_id,
            finding_site=hd.sr.FindingSite(
                anatomic_location=_anatomy(assessment.region, ordered_headers[0]),
                laterality=LATERALITY.get(study_side) if study_side else None,
            ),
            covariates=assessment.covariates,
        )
    ]
    for (number, image, _), header in zip(ordered, ordered_headers, strict=True):
        what = f"image {number}"
        _check_assessment(image.result.assessment, what)
        side = reporting.laterality(header)
        groups.append(
            _group(
                identifier=image_identifier(number, image.result.region, header),
                tracking_uid=_tracking_uid(str(header.SOPInstanceUID), image.result.region, algorithm.checkpoint_sha256),
                assessment=image.result.assessment,
                algorithm_id=algorithm_id,
                finding_site=hd.sr.FindingSite(
                    anatomic_location=_anatomy(image.result.region, header),
                    laterality=LATERALITY.get(side) if side else None,
                ),
                covariates=None,
                # The constructor, not from_source_image(): the latter insists on the pixel
                # module, which a header-only read of the source may lack.
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(
                        referenced_sop_class_uid=header.SOPClassUID,
                        referenced_sop_instance_uid=header.SOPInstanceUID,
                    )
                ],
            )
        )

    device_uid = device_observer_uid or _tracking_uid(
        "device", algorithm.name, algorithm.version, algorithm.checkpoint_sha256
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name="OsteoGate",
                manufacturer_name=algorithm.manufacturer,
                model_name=algorithm.name[:64],
            ),
        )
    )
    library = _library_headers(ordered_headers)
    measurement_report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=RADIOGRAPHY_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=library or None,
    )
    root = measurement_report[0]
    _compact(root)
    # The summary goes right after the context items, before the image library: the first thing
    # dsr2html and PACS SR viewers show under the title.
    first_contains = next(
        (i for i, item in enumerate(root.ContentSequence) if item.RelationshipType == "CONTAINS"),
        len(root.ContentSequence),
    )
    root.ContentSequence.insert(first_contains, _text(SUMMARY, reporting.summary_text(assessment)))
    texts = [DISCLAIMER, *(f"{_SKIPPED_PREFIX}{s.reason}" for s in report.skipped)]
    root.ContentSequence.extend(QualitativeEvaluationsContainer(texts))

    now = content_datetime or datetime.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=ordered_headers,
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        # Two values (VM 1-n): gateway software and model card version.
        software_versions=[f"osteogate {software_version()}"[:64], f"model {algorithm.version}"[:64]],
        series_description=SERIES_DESCRIPTION,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,  # PreliminaryFlag PRELIMINARY: a screening aid's result awaits a reader
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME, name="OsteoGate local codes", responsible_organization="OsteoGate"
            )
        ],
    )
    # Without SeriesDate PACS file the series under an unknown date (Orthanc showed "?").
    sr.SeriesDate = now.strftime("%Y%m%d")
    sr.SeriesTime = now.strftime("%H%M%S")
    reporting.ensure_charset(sr)
    return sr


# --- reading back (highdicom parses; we only name things) ------------------------------------

_CLASS_BY_CODE: dict[str, str] = {code.value: name for name, code in CLASS_CODES.items()}


@dataclass
class GroupReading:
    """One measurement group of a result SR, as read back."""

    identifier: str
    sites: str
    assessed: bool
    label: str | None
    percent: dict[str, float]
    t_score: float | None
    t_interval: tuple[float, float] | None
    inputs: dict[str, str]
    comments: list[str]


@dataclass
class ResultReading:
    summary: str
    algorithm: str
    groups: list[GroupReading]
    notes: list[str]  # the Qualitative Evaluations texts (disclaimer, skipped images)


def _code_value(item: pydicom.Dataset, keyword: str) -> str:
    sequence = item.get(keyword)
    return str(sequence[0].CodeValue) if sequence else ""


def _num(item: hd.sr.NumContentItem) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def _read_group(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> GroupReading:
    percent: dict[str, float] = {}
    inputs: dict[str, str] = {}
    t_score = None
    t_interval = None
    for measurement in group.get_measurements():
        name = measurement.name.value
        if name == PROBABILITY.value:
            finding = hd.sr.utils.find_content_items(measurement[0], name=ASSOCIATED_FINDING)
            cls = _code_value(finding[0], "ConceptCodeSequence") if finding else ""
            percent[_CLASS_BY_CODE.get(cls, cls)] = float(measurement.value)
        elif name == T_SCORE.value:
            t_score = float(measurement.value)
            upper = hd.sr.utils.find_content_items(measurement[0], name=codes.SCT.RangeOfUpperMeasurementUncertainty)
            lower = hd.sr.utils.find_content_items(measurement[0], name=codes.SCT.RangeOfLowerMeasurementUncertainty)
            if upper and lower:
                t_interval = (t_score - _num(lower[0]), t_score + _num(upper[0]))
        elif name == SUBJECT_AGE.value:
            inputs["age"] = f"{measurement.value:g} y"
        elif name == BODY_WEIGHT.value:
            inputs["weight"] = f"{measurement.value:g} kg"
        elif name == BODY_HEIGHT.value:
            inputs["height"] = f"{measurement.value:g} m"
    label = None
    evaluated = False
    for evaluation in group.get_qualitative_evaluations():
        if evaluation.name.value == SUBJECT_SEX.value:
            inputs["sex"] = str(evaluation.value.meaning).lower()
        elif evaluation.name.value in _CLASS_BY_CODE:
            evaluated = True
            if evaluation.value.value == PRESENT.value:
                label = _CLASS_BY_CODE[evaluation.name.value]
    if evaluated and label is None:
        label = "normal"  # inverse of _evaluations(): neither disease class detected
    comments = [
        str(item.TextValue)
        for item in hd.sr.utils.find_content_items(group[0], name=COMMENT, value_type="TEXT")
    ]
    sites = ", ".join(
        " ".join([str(site.value.meaning), *(str(m.ConceptCodeSequence[0].CodeMeaning)
                                              for m in site.get("ContentSequence", []))])
        for site in group.finding_sites
    )
    return GroupReading(str(group.tracking_identifier), sites, evaluated, label, percent, t_score, t_interval,
                        inputs, comments)


def read_result(ds: pydicom.Dataset) -> ResultReading:
    """Parse an OsteoGate result SR with highdicom (raises on SRs that are not TID 1500)."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    root = sr.content[0]
    summary = " ".join(str(i.TextValue) for i in hd.sr.utils.find_content_items(root, name=SUMMARY))
    groups = report.get_image_measurement_groups()
    algorithm = ""
    if groups:
        name, version, params = (
            [str(i.TextValue) for i in hd.sr.utils.find_content_items(groups[0][0], name=code)]
            for code in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, codes.DCM.AlgorithmParameters)
        )
        algorithm = f"{' '.join(name)} version {' '.join(version)}" + (f" ({'; '.join(params)})" if params else "")
    notes: list[str] = []
    for container in hd.sr.utils.find_content_items(root, name=QUALITATIVE_EVALUATIONS, value_type="CONTAINER"):
        notes += [str(t.TextValue) for t in hd.sr.utils.find_content_items(container, value_type="TEXT")]
    return ResultReading(summary, algorithm, [_read_group(g) for g in groups], notes)


def _group_line(group: GroupReading) -> str:
    if group.assessed:
        probs = ", ".join(f"{k} {v:g} %" for k, v in group.percent.items())
        result = f"{group.label} ({probs})" if probs else str(group.label)
    else:
        reason = next((c.removeprefix(_NOT_ASSESSED_PREFIX) for c in group.comments
                       if c.startswith(_NOT_ASSESSED_PREFIX)), "no reason recorded")
        result = f"not assessed: {reason}"
    line = f"{group.identifier} [{group.sites}]: {result}"
    if group.t_score is not None:
        line += f"; T-score {reporting.fmt_t_score(group.t_score)}"
        if group.t_interval:
            line += f" (80 % PI {reporting.fmt_t_score(group.t_interval[0])} to {reporting.fmt_t_score(group.t_interval[1])})"
    inputs = next((c for c in group.comments if c.startswith("Inputs used")), "")
    if inputs:
        line += f"; {inputs[0].lower()}{inputs[1:]}"
    if group.inputs:
        line += " [" + ", ".join(f"{k} {v}" for k, v in group.inputs.items()) + "]"
    return line


def _summary_from_tree(items: Sequence[pydicom.Dataset], depth: int = 0) -> list[str]:
    """Fallback for SRs highdicom cannot parse as TID 1500: every item as "name: value"."""
    lines: list[str] = []
    for item in items:
        names = item.get("ConceptNameCodeSequence")
        name = str(names[0].CodeMeaning) if names else ""
        value_type = str(item.get("ValueType", ""))
        if value_type == "NUM" and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            units = measured.get("MeasurementUnitsCodeSequence")
            value = f"{measured.NumericValue} {units[0].CodeMeaning if units else ''}".rstrip()
        elif value_type == "CODE":
            concept = item.get("ConceptCodeSequence")
            value = str(concept[0].CodeMeaning) if concept else ""
        elif value_type in ("TEXT", "UIDREF"):
            value = str(item.get("TextValue", item.get("UID", "")))
        else:
            value = ""
        lines.append(f"{'  ' * depth}{name}: {value}".rstrip(": "))
        lines.extend(_summary_from_tree(item.get("ContentSequence", []), depth + 1))
    return lines


def sr_summary(ds: pydicom.Dataset) -> str:
    """Human-readable multi-line summary of an OsteoGate result SR (or, degraded, any SR)."""
    header = [
        f"{ds.get('SeriesDescription', 'Structured report')}: instance {ds.get('InstanceNumber', '?')}, "
        f"content {ds.get('ContentDate', '')} {ds.get('ContentTime', '')}".rstrip(),
        f"Completion {ds.get('CompletionFlag', '?')}, verification {ds.get('VerificationFlag', '?')}, "
        f"{ds.get('PreliminaryFlag', 'no preliminary flag')}",
    ]
    try:
        reading = read_result(ds)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        # Not a TID 1500 report highdicom understands (e.g. another vendor's SR): still show it.
        return "\n".join([*header, *_summary_from_tree(ds.get("ContentSequence", []))])
    body = [f"Summary: {reading.summary}"] if reading.summary else []
    if reading.algorithm:
        body.append(f"Algorithm: {reading.algorithm}")
    body += [_group_line(g) for g in reading.groups]
    body += [f"Skipped: {n.removeprefix(_SKIPPED_PREFIX)}" if n.startswith(_SKIPPED_PREFIX) else n
             for n in reading.notes]
    return "\n".join([*header, *body])
