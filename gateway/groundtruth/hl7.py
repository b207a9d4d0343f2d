"""HL7 v2 ORU^R01 DXA results: what is read, and the ACK that answers each message.

Read (python-hl7 parses; nothing here splits on separators by hand):

* MSH-9 message type (ORU^R01 only), MSH-10 message control ID (echoed in MSA-2);
* PID-3 patient identifier list: the first repetition with a type (CX.5) "MR", else the first
  non-empty one; CX.1 is the PatientID, CX.4 (namespace ID, else universal ID) its issuer;
* per OBR group: OBR-7 observation date; per OBX: OBX-3 code (one of ``groundtruth.loinc_codes``)
  and name, OBX-4 sub-ID (e.g. "neck"), OBX-5 T-score, OBX-11 status (D, W, X skipped), OBX-14
  observation date (wins over OBR-7).

Answer: AA when stored; AR when the message cannot be processed at all (not HL7, not ORU^R01);
AE when its content is wrong (no PID-3, a non-numeric or impossible T-score, no T-score OBX, no
date). MSA-3 carries the reason in one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime

import hl7
from hl7.util import generate_message_control_id
from osteogate.gateway.groundtruth.exams import DxaResult, DxaSiteValue, check_t_score

APPLICATION = "OSTEOGATE"
# OBX-11 result statuses that carry no usable value: deleted, wrong (replaced), cannot be obtained.
_SKIPPED_STATUSES = {"D", "W", "X"}


class Hl7Rejection(Exception):
    """A message answered with a NAK: ``code`` AE (content error) or AR (rejected)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _field(segment: hl7.Segment, field: int, repeat: int = 1, component: int = 1, sub: int = 1) -> str:
    """One value of ``segment`` (empty when absent), through python-hl7's own accessor rules."""
    try:
        return str(segment.extract_field(1, field, repeat, component, sub) or "").strip()
    except (IndexError, KeyError):
        return ""


def _repeats(segment: hl7.Segment, field: int) -> int:
    try:
        value = segment(field)
    except IndexError:
        return 0
    return len(value) if isinstance(value, hl7.Field) else 1


def parse_message(text: str) -> hl7.Message:
    """``text`` as an HL7 message, or Hl7Rejection(AR) when it is not one."""
    normalised = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not normalised.startswith("MSH"):
        raise Hl7Rejection("AR", "not an HL7 v2 message (no MSH segment first)")
    try:
        return hl7.parse(normalised)
    except Exception as exc:  # python-hl7 raises plain ParseException/IndexError on garbage
        raise Hl7Rejection("AR", f"the message cannot be parsed: {type(exc).__name__}") from None


def message_type(message: hl7.Message) -> tuple[str, str]:
    msh = message.segment("MSH")
    return _field(msh, 9, 1, 1), _field(msh, 9, 1, 2)


def control_id(message: hl7.Message) -> str:
    return _field(message.segment("MSH"), 10)


def _patient(message: hl7.Message) -> tuple[str, str | None]:
    try:
        pid = message.segment("PID")
    except KeyError:
        raise Hl7Rejection("AE", "no PID segment: the patient is unknown") from None
    candidates = []
    for repeat in range(1, _repeats(pid, 3) + 1):
        identifier = _field(pid, 3, repeat, 1)
        if identifier:
            issuer = _field(pid, 3, repeat, 4, 1) or _field(pid, 3, repeat, 4, 2)
            candidates.append((_field(pid, 3, repeat, 5).upper() == "MR", identifier, issuer or None))
    if not candidates:
        raise Hl7Rejection("AE", "PID-3 (patient identifier) is empty")
    _, identifier, issuer = max(candidates, key=lambda c: c[0])  # an MR first; else the first
    if len(identifier) > 64 or (issuer and len(issuer) > 64):
        raise Hl7Rejection("AE", "PID-3 identifier or assigning authority longer than 64 characters")
    return identifier, issuer


def parse_hl7_date(value: str, where: str) -> date:
    """The date part of an HL7 DTM (YYYYMMDD[HHMM[SS...]][+ZZZZ])."""
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        raise Hl7Rejection("AE", f"{where} {value[:26]!r} is not an HL7 date (YYYYMMDD...)") from None


def dxa_results(message: hl7.Message, loinc_codes: Iterable[str]) -> list[DxaResult]:
    """The DXA T-scores of an ORU^R01 message (the fields read are listed in the module docstring).

    Parameters
    ----------
    message
        A parsed message (``parse_message``).
    loinc_codes
        OBX-3 identifiers read as T-scores (``groundtruth.loinc_codes``); other OBX are ignored.

    Returns
    -------
    list of DxaResult
        One per T-score OBX (``exams.save_results`` merges those of one exam).

    Raises
    ------
    Hl7Rejection
        ``AR`` for another message type; ``AE`` for no PID-3, a non-numeric or impossible
        T-score, a missing or bad date, or no T-score OBX at all. Nothing of the message is used then.
    """
    kind, trigger = message_type(message)
    if (kind, trigger) != ("ORU", "R01"):
        raise Hl7Rejection("AR", f"message type {kind or '?'}^{trigger or '?'} is not accepted (only ORU^R01)")
    patient_id, issuer = _patient(message)
    codes = set(loinc_codes)
    reference = f"MSH-10 {control_id(message) or '(empty)'}"
    results: list[DxaResult] = []
    order_date = ""
    seen: list[str] = []
    number = 0
    for segment in message:
        name = str(segment[0])
        if name == "OBR":
            order_date = _field(segment, 7)
        if name != "OBX":
            continue
        number += 1
        code, text = _field(segment, 3, 1, 1), _field(segment, 3, 1, 2)
        seen.append(code or "?")
        if code not in codes or _field(segment, 11).upper() in _SKIPPED_STATUSES:
            continue
        raw = _field(segment, 5)
        try:
            t_score = float(raw)
        except ValueError:
            raise Hl7Rejection("AE", f"OBX {number} ({code}): OBX-5 {raw[:20]!r} is not a number") from None
        problem = check_t_score(t_score)
        if problem:
            raise Hl7Rejection("AE", f"OBX {number} ({code}): T-score {problem}")
        when = _field(segment, 14) or order_date
        if not when:
            raise Hl7Rejection("AE", f"OBX {number} ({code}): no date (OBX-14 and OBR-7 are empty)")
        where = "OBX-14" if _field(segment, 14) else "OBR-7"
        site = " ".join(part for part in (text or code, _field(segment, 4)) if part)
        results.append(DxaResult(patient_id, issuer, parse_hl7_date(when, where), "hl7", reference,
                                 (DxaSiteValue(site[:64], t_score, code),)))
    if not results:
        listed = ", ".join(sorted(set(seen))[:6]) or "none"
        raise Hl7Rejection("AE", f"no DXA T-score OBX (OBX-3 codes seen: {listed}; accepted: groundtruth.loinc_codes)")
    return results


def _one_line(text: str) -> str:
    # MSA-3 is one short line; line breaks would end the segment.
    return " ".join(text.split())[:200]


def ack(message: hl7.Message | None, code: str, reason: str = "") -> str:
    """The ACK for ``message``, built by python-hl7 (``Message.create_ack``).

    Parameters
    ----------
    message
        The message answered; None when the frame could not be parsed (the ACK then has an empty
        MSA-2).
    code
        MSA-1: "AA", "AE" or "AR".
    reason
        MSA-3, one line, HL7-escaped.

    Returns
    -------
    str
        The ACK message, segments separated by CR, without MLLP framing.
    """
    if message is not None:
        try:
            reply = message.create_ack(code, application=APPLICATION)
            if reason:  # escaped (ORU^R01 -> ORU\S\R01) so the reason stays one field
                reply.segment("MSA").assign_field(message.escape(_one_line(reason)), 3)
            return str(reply)
        except Exception:  # an MSH too broken to answer from: fall through to a plain ACK
            pass
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    plain = hl7.parse(f"MSH|^~\\&|{APPLICATION}\r")
    return (f"MSH|^~\\&|{APPLICATION}||||{stamp}||ACK|{generate_message_control_id()}|P|2.5\r"
            f"MSA|{code}||{plain.escape(_one_line(reason))}")
