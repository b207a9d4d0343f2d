"""The result card: a Secondary Capture image of the result, for PACS viewers that cannot show an SR.

One card is made for every SR version, from the same ``StudyReport``, into its own series of the
source study (stable series UID, InstanceNumber = result version). It shows, legible both as a PACS
thumbnail and full screen: the decision, the estimated T-score with its 80 % interval and its WHO
category in one banner line (gateway/report/wording.headline, the SR's first sentence), the class
probabilities of the same T-score distribution as bars, the estimate on a WHO scale, which inputs
were used or missing, a downscaled copy of each source image (analysed regions outlined only when
the result read that radiograph; "not used" otherwise), the producing head's name, version and
validation, and the screening-aid disclaimer. Drawing is in card_draw.py, text layout (fit to box,
font coverage) in card_layout.py.

IOD: Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7), single frame, RGB, 8 bit,
uncompressed. It is the one SC every PACS and viewer handles (Orthanc Explorer's preview, OHIF and
Stone, and old PACS that predate the multi-frame SC IODs); colour carries the result category, which
Grayscale SC would lose; one page needs no frames. Text is burned in (BurnedInAnnotation YES) with a
scalable TrueType font found through fontconfig (or the usual font folders): never Pillow's
bitmap fallback, which is unreadable at this size.

The card is built by Pillow (drawing) and highdicom (``SCImage``: patient and study modules copied
from the source header after the same cleaning as the SR's evidence).
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.card_draw import CARD_SIZE, draw_card
from osteogate.gateway.report.card_layout import FontUnavailable, Layout, find_font
from osteogate.gateway.report.content import StudyReport
from osteogate.gateway.report.sr import SERIES_NUMBER as SR_SERIES_NUMBER
from osteogate.gateway.report.sr import software_version
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

__all__ = ["CARD_SIZE", "FontUnavailable", "Layout", "build_result_card", "find_font", "layout_card", "render_card"]

SERIES_DESCRIPTION = "OsteoGate result card"
SERIES_NUMBER = SR_SERIES_NUMBER + 1


def render_card(report: StudyReport, *, version: int, created: datetime.datetime) -> Image.Image:
    """The card as an RGB picture (the DICOM object's pixels; tests save it as PNG to look at).

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
    PIL.Image.Image
    """
    return draw_card(report, version=version, created=created)[0]


def layout_card(report: StudyReport, *, version: int = 1,
                created: datetime.datetime | None = None) -> Layout:
    """Every string the card prints, with its box, lines and font size (what the tests read).

    Parameters
    ----------
    report : StudyReport
        The result.
    version : int
        The result version.
    created : datetime.datetime or None
        When it was made (default: now).

    Returns
    -------
    Layout
    """
    return draw_card(report, version=version, created=created or datetime.datetime.now())[1]


# -- DICOM -------------------------------------------------------------------------------------


def build_result_card(
    report: StudyReport,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    content_datetime: datetime.datetime | None = None,
    institution_name: str | None = None,
    series_number: int = SERIES_NUMBER,
) -> hd.sc.SCImage:
    """The card as a DICOM Secondary Capture Image in the source study (see the module docstring).

    Parameters
    ----------
    report : StudyReport
        The result.
    series_instance_uid, sop_instance_uid : str
        UIDs of the card.
    instance_number : int
        The result version.
    content_datetime : datetime.datetime or None
        Content date/time (default: now).
    institution_name : str or None
        Institution.
    series_number : int
        The card's series number.

    Returns
    -------
    highdicom.sc.SCImage

    Raises
    ------
    ValueError
        Without a source image.
    FontUnavailable
        Without a scalable font.
    """
    if not report.sources:
        raise ValueError("a result card needs at least one source image")
    now = content_datetime or datetime.datetime.now()
    ordered = [image.source for _, image, _ in report.images]
    reference = reporting.evidence_header(ordered[0])
    pixels = np.asarray(render_card(report, version=instance_number, created=now), dtype=np.uint8)
    card = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        # highdicom asks for a coordinate system; the card is a page, not a view of the patient, so
        # its PatientOrientation is emptied below (Type 2C: present, empty).
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=report.algorithm.manufacturer,
        transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian: every PACS takes it
        manufacturer_model_name=report.producer[:64],
        software_versions=[f"osteogate {software_version()}"[:64], f"model {report.algorithm.version}"[:64]],
        series_description=SERIES_DESCRIPTION,
        institution_name=institution_name,
    )
    card.PatientOrientation = ""
    # General Series Laterality is Type 2C for paired parts such as the knee: the side when every
    # source image states the same one, else present and empty (never a guessed side).
    sides = {reporting.laterality(source) for source in ordered}
    card.Laterality = sides.pop() if len(sides) == 1 and sides <= {"R", "L"} else ""
    card.ConversionType = "SYN"  # synthetic image: drawn by software, not digitised
    card.BurnedInAnnotation = "YES"
    card.ImageComments = "OsteoGate result card: screening aid, not a diagnosis; not cleared for clinical use"
    card.DerivationDescription = "Result card drawn from the OsteoGate result and downscaled source images"
    card.SeriesDate = card.ContentDate = card.DateOfSecondaryCapture = now.strftime("%Y%m%d")
    card.SeriesTime = card.ContentTime = card.TimeOfSecondaryCapture = now.strftime("%H%M%S")
    # Patient Study module values (age, size, weight) of the source, when valid.
    for keyword in ("PatientAge", "PatientSize", "PatientWeight", "StudyDescription", "IssuerOfPatientID"):
        if keyword in reference and keyword not in card:
            card[keyword] = reference[keyword]
    purpose = hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    references = []
    for source in ordered:
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        item.PurposeOfReferenceCodeSequence = [purpose]
        references.append(item)
    card.SourceImageSequence = references
    reporting.ensure_charset(card)
    return card
