"""OsteoGate result report: a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

Content tree (codes in brackets)::

    CONTAINER Imaging Measurement Report (DCM 126000)                      TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name /
                       Manufacturer / Model Name                           TID 1001/1004
      HAS CONCEPT MOD  Procedure reported = Radiographic imaging procedure (SCT 363680008)
      CONTAINS         Image Library: one entry per classified source image TID 1600
      CONTAINS         Imaging Measurements (DCM 126010)
        Measurement Group "image N (region)" per classified image           TID 1501
          Tracking Identifier / Tracking Unique Identifier
          Finding Site (SCT 363698007) = Knee | Spine | Lumbar spine ... (+ laterality)
          Algorithm Name / Version / Parameters ("checkpoint_sha256=...")   TID 4019
          NUM Probability (DCM 122157) [UCUM 1], one per class, each with
              HAS CONCEPT MOD Associated finding (SCT 246090004) = Normal (SCT 17621005) |
                              Osteopenia (SCT 312894000) | Osteoporosis (SCT 64859006)
          CODE Osteoporosis (SCT 64859006) = Detected | Not detected (SCT 260373001 | 260415000)
          CODE Osteopenia (SCT 312894000)   = Detected | Not detected
          IMAGE Source of Measurement (the classified image)
        Measurement Group "study summary" (only when a study label is given; no IMAGE item,
          so per TID 1501 it applies to every image in the report)
      CONTAINS         Qualitative Evaluations (UMLS C0034375)              TID 1500 row 12
        TEXT Comment (DCM 121106) = screening disclaimer
        TEXT Comment (DCM 121106) = "Image not classified: <reason>" per skipped image

Why "Probability + Associated finding" rather than one concept name per class: DICOM has no
standard per-class probability codes for bone density, and a private scheme would be opaque
to PACS viewers. The generic Probability concept qualified by a standard SNOMED CT finding
keeps every code standard, and dsrdump / viewers render it as
"Probability = 0.8 ... Associated finding = Osteoporosis".
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata

import highdicom as hd
import pydicom
from highdicom.sr.templates import Template
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

__all__ = [
    "AlgorithmInfo",
    "ImageFinding",
    "SkippedImage",
    "ClassProbability",
    "QualitativeEvaluationsContainer",
    "DISCLAIMER",
    "SERIES_DESCRIPTION",
    "CLASSES",
    "build_result_sr",
    "sr_summary",
]

DISCLAIMER = (
    "Screening aid only: this result is not a diagnosis and cannot rule out low bone density; "
    "confirm with DXA."
)
SERIES_DESCRIPTION = "OsteoGate bone density screening"
CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
REGIONS: tuple[str, ...] = ("knee", "spine")

# --- codes --------------------------------------------------------------------------------
PROBABILITY = codes.DCM.Probability  # DCM 122157 "Probability"
UNITLESS = Code("1", "UCUM", "no units")  # CID 7181 spelling of the dimensionless unit
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
LATERALITY: dict[str, Code] = {"R": Code("24028007", "SCT", "Right"), "L": Code("7771000", "SCT", "Left")}

# Type 2 patient/study attributes highdicom reads from the first evidence instance with plain
# attribute access; modalities often omit them, so they are filled with empty values (which
# is what Type 2 means) on a header copy instead of crashing the worker.
_TYPE2_COPIED = (
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
_SUMMARY_TRACKING_ID = "study summary"


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str  # e.g. "OsteoGate EfficientNet-B0" or "UNTRAINED OsteoGate ..." (card.display_name)
    version: str  # card version
    checkpoint_sha256: str
    manufacturer: str = "OsteoGate"


@dataclass(frozen=True)
class ImageFinding:
    source: pydicom.Dataset  # header of the classified source image (no pixel data needed)
    region: str  # "knee" | "spine"
    probabilities: Mapping[str, float]  # keys "normal", "osteopenia", "osteoporosis"
    label: str  # argmax / thresholded class


@dataclass(frozen=True)
class SkippedImage:
    source: pydicom.Dataset
    reason: str  # e.g. "region unknown", "out of scope: CHEST"


class ClassProbability(hd.sr.Measurement):
    """TID 300 Measurement "Probability" (DCM 122157) qualified by the class it is about.

    The class goes in a HAS CONCEPT MOD "Associated finding" (SCT 246090004) CODE item on the
    NUM, so all three per-class probabilities share one standard concept name.
    """

    def __init__(self, class_name: str, probability: float) -> None:
        if class_name not in CLASS_CODES:
            raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
        if not 0.0 <= float(probability) <= 1.0:
            raise ValueError(f"probability of {class_name!r} out of [0, 1]: {probability}")
        super().__init__(name=PROBABILITY, value=float(probability), unit=UNITLESS)
        num_item = self[0]
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
        container.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.TextContentItem(
                    name=COMMENT,
                    value=text,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
                for text in texts
            ]
        )
        self.append(container)


# --- builder --------------------------------------------------------------------------------


def _check_probabilities(probabilities: Mapping[str, float], what: str) -> None:
    if set(probabilities) != set(CLASSES):
        raise ValueError(f"{what}: probabilities must have keys {CLASSES}, got {sorted(probabilities)}")


def _check_label(label: str, what: str) -> None:
    if label not in CLASSES:
        raise ValueError(f"{what}: label {label!r} is not one of {CLASSES}")


def _evidence_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """Header-only copy of a source image, with absent Type 2 patient/study attributes empty."""
    header = pydicom.Dataset()
    for element in source:
        # Pixel data is never needed for references and would bloat the deep copies below.
        if element.tag.group in (0x7FE0, 0x0002):
            continue
        header.add(element)
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _finding_site(finding: ImageFinding) -> hd.sr.FindingSite:
    if finding.region == "knee":
        location = KNEE
    elif finding.region == "spine":
        body_part = str(finding.source.get("BodyPartExamined", "")).upper()
        location = SPINE_SEGMENTS.get(body_part, SPINE)
    else:
        raise ValueError(f"region {finding.region!r} is not one of {REGIONS}")
    side = str(finding.source.get("ImageLaterality", finding.source.get("Laterality", ""))).upper()
    return hd.sr.FindingSite(anatomic_location=location, laterality=LATERALITY.get(side))


def _evaluations(label: str) -> list[hd.sr.QualitativeEvaluation]:
    """Present/absent for the two disease classes, derived from the (thresholded) label."""
    return [
        hd.sr.QualitativeEvaluation(OSTEOPOROSIS, PRESENT if label == "osteoporosis" else ABSENT),
        hd.sr.QualitativeEvaluation(OSTEOPENIA, PRESENT if label == "osteopenia" else ABSENT),
    ]


def _probabilities(probabilities: Mapping[str, float]) -> list[hd.sr.Measurement]:
    return [ClassProbability(name, probabilities[name]) for name in CLASSES]


def _algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    # TID 4019 has no slot for a hash; "Algorithm Parameters" is free text and travels with
    # every group, so a reader can tell exactly which weights produced the numbers.
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"checkpoint_sha256={algorithm.checkpoint_sha256}"],
        manufacturer=algorithm.manufacturer,
    )


def _tracking_uid(*parts: str) -> str:
    # Deterministic: the same image classified by the same model in a later report version
    # keeps its Tracking Unique Identifier, which is what TID 4108 tracking is for.
    return generate_uid(entropy_srcs=["osteogate-sr", *parts])


def _software_version() -> str:
    try:
        return metadata.version("osteogate")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_result_sr(
    findings: Sequence[ImageFinding],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    skipped: Sequence[SkippedImage] = (),
    study_label: str | None = None,
    study_probabilities: Mapping[str, float] | None = None,
    predecessor: pydicom.Dataset | None = None,
    device_observer_uid: str | None = None,
    institution_name: str | None = None,
    series_number: int = 9901,
    content_datetime: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the OsteoGate result SR for one study (see the module docstring for the tree).

    Raises ValueError when there is no finding (TID 1500 needs at least one measurement
    group), when findings / skipped images / the predecessor span more than one study, or on
    unknown regions, classes or out-of-range probabilities.
    """
    if not findings:
        raise ValueError("a result SR needs at least one classified image")
    study_uids = {str(f.source.StudyInstanceUID) for f in findings}
    study_uids |= {str(s.source.StudyInstanceUID) for s in skipped}
    if predecessor is not None:
        study_uids.add(str(predecessor.StudyInstanceUID))
    if len(study_uids) != 1:
        raise ValueError(f"findings belong to {len(study_uids)} different studies; one SR per study")
    if (study_label is None) != (study_probabilities is None):
        raise ValueError("study_label and study_probabilities must be given together")

    algorithm_id = _algorithm_id(algorithm)
    headers = [_evidence_header(f.source) for f in findings]
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    # Study-level sites without laterality: a study may hold left and right knees.
    study_sites: dict[str, Code] = {}
    for index, (finding, header) in enumerate(zip(findings, headers, strict=True), start=1):
        what = f"image {index}"
        _check_probabilities(finding.probabilities, what)
        _check_label(finding.label, what)
        site = _finding_site(finding)
        study_sites.setdefault(site.value.value, site.value)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_tracking_uid(
                        str(header.SOPInstanceUID), finding.region, algorithm.checkpoint_sha256
                    ),
                    identifier=f"{what} ({finding.region})",
                ),
                algorithm_id=algorithm_id,
                finding_sites=[site],
                measurements=_probabilities(finding.probabilities),
                qualitative_evaluations=_evaluations(finding.label),
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
    if study_label is not None and study_probabilities is not None:
        _check_probabilities(study_probabilities, "study")
        _check_label(study_label, "study")
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_tracking_uid(str(headers[0].StudyInstanceUID), algorithm.checkpoint_sha256),
                    identifier=_SUMMARY_TRACKING_ID,
                ),
                algorithm_id=algorithm_id,
                finding_sites=[hd.sr.FindingSite(study_sites[k]) for k in sorted(study_sites)],
                measurements=_probabilities(study_probabilities),
                qualitative_evaluations=_evaluations(study_label),
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
                model_name=algorithm.name,
            ),
        )
    )
    # The image library needs Rows/Columns; a header without them is still referenced from
    # its measurement group, it only lacks a library entry.
    library = [h for h in headers if "Rows" in h and "Columns" in h]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=RADIOGRAPHY_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=library or None,
    )
    texts = [DISCLAIMER, *(f"Image not classified: {s.reason}" for s in skipped)]
    report[0].ContentSequence.extend(QualitativeEvaluationsContainer(texts))

    now = content_datetime or datetime.datetime.now()
    return hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        # Two values (VM 1-n): gateway software and model card version.
        software_versions=[f"osteogate {_software_version()}"[:64], f"model {algorithm.version}"[:64]],
        series_description=SERIES_DESCRIPTION,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
    )


# --- reading back ---------------------------------------------------------------------------

_CLASS_BY_CODE: dict[str, str] = {code.value: name for name, code in CLASS_CODES.items()}
_SKIPPED_PREFIX = "Image not classified: "


def _code_value(item: pydicom.Dataset, keyword: str) -> str:
    sequence = item.get(keyword)
    return str(sequence[0].CodeValue) if sequence else ""


def _code_meaning(item: pydicom.Dataset, keyword: str) -> str:
    sequence = item.get(keyword)
    return str(sequence[0].CodeMeaning) if sequence else ""


def _measurement_class(measurement: hd.sr.Measurement) -> str:
    """Class name of a ClassProbability read back (its "Associated finding" modifier)."""
    for modifier in measurement[0].get("ContentSequence", []):
        if _code_value(modifier, "ConceptNameCodeSequence") == ASSOCIATED_FINDING.value:
            code = _code_value(modifier, "ConceptCodeSequence")
            return _CLASS_BY_CODE.get(code, _code_meaning(modifier, "ConceptCodeSequence"))
    return str(measurement.name.meaning)


def _group_label(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> str:
    # Inverse of _evaluations(): the one disease evaluation that is Present, else "normal".
    for evaluation in group.get_qualitative_evaluations():
        if evaluation.value.value == PRESENT.value:
            return _CLASS_BY_CODE.get(evaluation.name.value, str(evaluation.name.meaning))
    return "normal"


def _group_texts(group: hd.sr.MeasurementsAndQualitativeEvaluations, names: Sequence[Code]) -> list[str]:
    wanted = {code.value for code in names}
    return [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and _code_value(item, "ConceptNameCodeSequence") in wanted
    ]


def _summary_from_report(ds: pydicom.Dataset) -> list[str]:
    report = hd.sr.MeasurementReport.from_sequence(_root_sequence(ds))
    groups = report.get_image_measurement_groups()
    lines: list[str] = []
    if groups:
        name, version, params = (
            _group_texts(groups[0], [code])
            for code in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, codes.DCM.AlgorithmParameters)
        )
        lines.append(f"Algorithm: {' '.join(name)} version {' '.join(version)} ({'; '.join(params)})")
    for group in groups:
        probabilities = {_measurement_class(m): float(m.value) for m in group.get_measurements()}
        probs = ", ".join(f"{k} {v:.3f}" for k, v in probabilities.items())
        sites = ", ".join(
            " ".join([str(site.value.meaning), *(str(m.value.meaning) for m in _site_modifiers(site))])
            for site in group.finding_sites
        )
        lines.append(f"{group.tracking_identifier} [{sites}]: {_group_label(group)} ({probs})")
    for item in _root_sequence(ds)[0].ContentSequence:
        if _code_value(item, "ConceptNameCodeSequence") != QUALITATIVE_EVALUATIONS.value:
            continue
        for text_item in item.get("ContentSequence", []):
            text = str(text_item.get("TextValue", ""))
            lines.append(
                f"Skipped: {text.removeprefix(_SKIPPED_PREFIX)}" if text.startswith(_SKIPPED_PREFIX) else text
            )
    return lines


def _site_modifiers(site: hd.sr.FindingSite) -> list[hd.sr.CodeContentItem]:
    return [hd.sr.CodeContentItem.from_dataset(m) for m in site.get("ContentSequence", [])]


def _root_sequence(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The document root as a one-item content sequence (the SR dataset *is* the root item)."""
    root = pydicom.Dataset()
    root.ValueType = ds.ValueType
    root.ConceptNameCodeSequence = ds.ConceptNameCodeSequence
    root.ContinuityOfContent = ds.get("ContinuityOfContent", "SEPARATE")
    root.ContentTemplateSequence = ds.get("ContentTemplateSequence", [])
    root.ContentSequence = ds.ContentSequence
    return [root]


def _summary_from_tree(items: Sequence[pydicom.Dataset], depth: int = 0) -> list[str]:
    """Fallback for SRs highdicom cannot parse as TID 1500: every item as "name: value"."""
    lines: list[str] = []
    for item in items:
        name = _code_meaning(item, "ConceptNameCodeSequence")
        value_type = str(item.get("ValueType", ""))
        if value_type == "NUM" and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            value = f"{measured.NumericValue} {_code_meaning(measured, 'MeasurementUnitsCodeSequence')}"
        elif value_type == "CODE":
            value = _code_meaning(item, "ConceptCodeSequence")
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
        f"Completion {ds.get('CompletionFlag', '?')}, verification {ds.get('VerificationFlag', '?')}",
    ]
    try:
        body = _summary_from_report(ds)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        # Not a TID 1500 report highdicom understands (e.g. another vendor's SR): still show it.
        body = _summary_from_tree(ds.get("ContentSequence", []))
    return "\n".join([*header, *body])
