"""OsteoGate result report: a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

Built from a ``StudyReport`` (gateway/report/content.py: the model's ``StudyAssessment`` and the
source headers). Split as highdicom splits templates: codes in sr_codes.py, the TID 1501 groups in
sr_groups.py, reading back in sr_read.py; this module assembles the document. Content tree::

    CONTAINER Imaging Measurement Report (DCM 126000)                      TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name /
                       Manufacturer / Model Name (the head that produced the result)  TID 1001/1004
      HAS CONCEPT MOD  Procedure reported = Radiographic imaging procedure (SCT 363680008)
      CONTAINS TEXT    Summary (DCM 121111) = "DXA REFERRAL SUGGESTED - estimated T-score -1.9
                       (80 % interval -2.4 to -1.4), osteopenia range; from age, sex, weight and
                       height in the header; the radiograph was not used. P(T < -1.0) 93 %, ...
                       Screening aid, not a diagnosis. Not cleared for clinical use."
      CONTAINS         Image Library: one entry per source image with the needed attributes
      CONTAINS         Imaging Measurements (DCM 126010)
        Measurement Group "study result" (no IMAGE item: applies to every image)  TID 1501
          (see gateway/report/sr_groups.py: class probabilities, the estimated T-score NUM whose
          uncertainty range is the printed 80 % interval, the covariates used, CODE WHO category
          of the estimate, CODE Recommended Follow-up = DXA referral suggested | Below the
          referral threshold, comments)
        Measurement Group "image N (knee, right)" per scored image, same items (no covariate
          values), plus IMAGE Source of Measurement
      CONTAINS         Qualitative Evaluations (UMLS C0034375)              TID 1500 row 12
        TEXT Comment (DCM 121106) = screening disclaimer
        TEXT Comment (DCM 121106) = "Image not classified: <reason>" per reason (" (N images)")

Nothing that is "not assessed" carries a probability, a T-score, a category or a decision: the
group says "Not assessed: <reason>" instead. Every number derives from the model's one T-score
distribution (model/estimand.py), so the category, the probabilities, the interval and the
decision cannot disagree.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from importlib import metadata

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.content import AlgorithmInfo, ReportedImage, SkippedImage, StudyReport
from osteogate.gateway.report.sr_codes import (
    LATERALITY,
    PRIVATE_SCHEME,
    RADIOGRAPHY_PROCEDURE,
    SKIPPED_PREFIX,
    STUDY_TRACKING_ID,
    SUMMARY,
)
from osteogate.gateway.report.sr_groups import (
    ClassProbability,
    QualitativeEvaluationsContainer,
    anatomy,
    check_assessment,
    compact,
    measurement_group,
    study_side,
    text_item,
)
from osteogate.gateway.report.sr_read import read_result, sr_summary
from osteogate.gateway.report.wording import DISCLAIMER
from pydicom.sr.codedict import codes
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


def _algorithm_id(algorithm: AlgorithmInfo, name: str) -> hd.sr.AlgorithmIdentification:
    # TID 4019 has no slot for a hash; "Algorithm Parameters" is free text and travels with
    # every group, so a reader can tell exactly which weights produced the numbers. ``name`` is the
    # head's (a covariates-only result never names the image network).
    return hd.sr.AlgorithmIdentification(
        name=name[:64],
        version=algorithm.version[:64],
        parameters=[f"checkpoint_sha256={algorithm.checkpoint_sha256}"],
        manufacturer=algorithm.manufacturer,
    )


def _tracking_uid(*parts: str) -> str:
    # Deterministic: the same image classified by the same model in a later report version
    # keeps its Tracking Unique Identifier, which is what TID 4108 tracking is for.
    return generate_uid(entropy_srcs=["osteogate-sr", *parts])


def software_version() -> str:
    """The installed osteogate version ("unknown" outside an install).

    Returns
    -------
    str
    """
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
    """ "image 2 (knee, right)": the name of an image in the SR and on the card.

    Parameters
    ----------
    number : int
        The image's number in the report.
    region : str
        Its region.
    header : pydicom.Dataset
        Its header (laterality).

    Returns
    -------
    str
    """
    side = reporting.laterality(header)
    return f"image {number} ({region}{', ' + reporting.SIDE_WORDS[side] if side else ''})"


def _groups(report: StudyReport, headers: list[pydicom.Dataset], ordered: list[tuple[int, ReportedImage, object]],
            ordered_headers: list[pydicom.Dataset]) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The study group, then one group per image in the card's order."""
    assessment = report.assessment
    algorithm = report.algorithm
    algorithm_id = _algorithm_id(algorithm, report.producer)
    side = study_side(ordered_headers)
    groups = [
        measurement_group(
            identifier=STUDY_TRACKING_ID,
            tracking_uid=_tracking_uid(str(headers[0].StudyInstanceUID), algorithm.checkpoint_sha256),
            assessment=assessment.study,
            algorithm_id=algorithm_id,
            finding_site=hd.sr.FindingSite(anatomic_location=anatomy(assessment.region, ordered_headers[0]),
                                           laterality=LATERALITY.get(side) if side else None),
            covariates=assessment.covariates,
        )
    ]
    for (number, image, _), header in zip(ordered, ordered_headers, strict=True):
        check_assessment(image.result.assessment, f"image {number}")
        image_side = reporting.laterality(header)
        groups.append(
            measurement_group(
                identifier=image_identifier(number, image.result.region, header),
                tracking_uid=_tracking_uid(str(header.SOPInstanceUID), image.result.region, algorithm.checkpoint_sha256),
                assessment=image.result.assessment,
                algorithm_id=algorithm_id,
                finding_site=hd.sr.FindingSite(anatomic_location=anatomy(image.result.region, header),
                                               laterality=LATERALITY.get(image_side) if image_side else None),
                covariates=None,
                # The constructor, not from_source_image(): the latter insists on the pixel
                # module, which a header-only read of the source may lack.
                source_images=[hd.sr.SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=header.SOPInstanceUID)],
            )
        )
    return groups


def _observation_context(report: StudyReport, device_observer_uid: str | None) -> hd.sr.ObservationContext:
    algorithm = report.algorithm
    device_uid = device_observer_uid or _tracking_uid("device", algorithm.name, algorithm.version,
                                                      algorithm.checkpoint_sha256)
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid, name="OsteoGate", manufacturer_name=algorithm.manufacturer,
                model_name=report.producer[:64],
            ),
        )
    )


def _skipped_texts(skipped: Sequence[SkippedImage]) -> list[str]:
    """One comment per reason, in first-seen order, with how many images it applies to when more
    than one (a study of hundreds of images not read gives one line, not hundreds)."""
    counts = Counter(s.reason for s in skipped)
    return [f"{SKIPPED_PREFIX}{reason}" + (f" ({n} images)" if n > 1 else "") for reason, n in counts.items()]


def _content(report: StudyReport, groups: list[hd.sr.MeasurementsAndQualitativeEvaluations],
             ordered_headers: list[pydicom.Dataset], device_observer_uid: str | None) -> pydicom.Dataset:
    """The root CONTAINER: TID 1500 from highdicom, the summary first, the disclaimer container last."""
    library = _library_headers(ordered_headers)
    measurement_report = hd.sr.MeasurementReport(
        observation_context=_observation_context(report, device_observer_uid),
        procedure_reported=RADIOGRAPHY_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=library or None,
    )
    root = measurement_report[0]
    compact(root)
    # The summary goes right after the context items, before the image library: the first thing
    # dsr2html and PACS SR viewers show under the title.
    first_contains = next(
        (i for i, item in enumerate(root.ContentSequence) if item.RelationshipType == "CONTAINS"),
        len(root.ContentSequence),
    )
    root.ContentSequence.insert(first_contains, text_item(SUMMARY, reporting.summary_text(report.assessment)))
    texts = [DISCLAIMER, *_skipped_texts(report.skipped)]
    root.ContentSequence.extend(QualitativeEvaluationsContainer(texts))
    return root


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

    Parameters
    ----------
    report : StudyReport
        The result and the source headers.
    series_instance_uid, sop_instance_uid : str
        UIDs of the SR.
    instance_number : int
        The report version.
    predecessor : pydicom.Dataset or None
        The previous version (Predecessor Documents Sequence).
    device_observer_uid, institution_name : str or None
        Observer device UID (default: derived from the checkpoint) and institution.
    series_number : int
        The SR series number.
    content_datetime : datetime.datetime or None
        Content date/time (default: now).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR

    Raises
    ------
    ValueError
        When there is no image result (TID 1500 needs at least one measurement group besides the
        study's), when images / skipped images / the predecessor span more than one study, or on
        unknown regions, classes or decisions.
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
    check_assessment(assessment.study, "study")
    by_uid = {str(s.SOPInstanceUID): h for s, h in zip(report.sources, headers, strict=True)}
    ordered = report.images
    ordered_headers = [by_uid[str(image.source.SOPInstanceUID)] for _, image, _ in ordered]
    root = _content(report, _groups(report, headers, ordered, ordered_headers), ordered_headers, device_observer_uid)

    algorithm = report.algorithm
    now = content_datetime or datetime.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=ordered_headers,
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=report.producer[:64],
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
