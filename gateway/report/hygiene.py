"""Header hygiene shared by the SR and the result card: laterality, and copies of source headers cleaned so that a PACS accepts what we write.

Pure (no I/O); split out of gateway/report/wording.py so that module holds only the words. (Image order lives in
gateway/work/outcome.image_order_key.)
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from osteogate.gateway.work.outcome import safe_get
from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import STR_VR, validate_value

# -- images --------------------------------------------------------------------------------------


def laterality(header: Dataset) -> str | None:
    """"R", "L" or "B" when the header says so (ImageLaterality, else the series' Laterality).

    Never guessed: ViewPosition (AP, PA, LAT...) names a projection, not a side, and free-text
    descriptions are not trusted for a side. "U" (unpaired) and anything else give None.

    Parameters
    ----------
    header : pydicom.dataset.Dataset
        A source image's header.

    Returns
    -------
    str or None
        "R", "L", "B" or None.
    """
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(safe_get(header, keyword) or "").strip().upper()
        if value in ("R", "L", "B"):
            return value
    return None


SIDE_WORDS = {"R": "right", "L": "left", "B": "both sides"}


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

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source header.
    depth : int
        Current sequence nesting (items deeper than 4 are dropped).

    Returns
    -------
    pydicom.dataset.Dataset
        The cleaned copy.
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
    a note from the model may hold characters the source's character set cannot write.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The dataset to fix in place.


    """
    if _non_ascii(ds) and ds.get("SpecificCharacterSet") != "ISO_IR 192":
        ds.SpecificCharacterSet = "ISO_IR 192"


def evidence_header(source: Dataset) -> Dataset:
    """Header of a source image fit to be copied into our SR / card: cleaned, Type 2 filled.

    Text values are decoded strings by now, so the character set only has to be able to write them:
    the source's when pydicom knows it, else UTF-8 (ISO_IR 192) when anything is not ASCII.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source image's header.

    Returns
    -------
    pydicom.dataset.Dataset
        The cleaned header with Type 2 patient/study attributes present.
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
    """A printable single-line value (card text), or "" when absent or unreadable.

    Parameters
    ----------
    header : pydicom.dataset.Dataset
        The header to read.
    keyword : str
        The attribute keyword.
    limit : int
        Most characters kept (the VR's maximum; the card wraps, it does not cut).

    Returns
    -------
    str
    """
    value = safe_get(header, keyword)
    if value is None:
        return ""
    text = " ".join(str(value).split())
    return text[:limit]
