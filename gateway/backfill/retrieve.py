"""Bringing a found study to the gateway: C-MOVE to the gateway's AE (default), or C-GET into a
scratch folder and on to the gateway's listener by C-STORE (PS3.4 C.4.2, C.4.3).

Each retrieve ends in a :class:`Retrieved`: received, a transient failure worth retrying with
backoff (0xA7xx out of resources, 0xCxxx unable to process, 0xB000 some sub-operations failed,
no answer, association rejected transiently) or a permanent one (0xA900, a permanent rejection).
A PACS that does not know the move destination (0xA801) stops the whole run
(:class:`MoveDestinationUnknown`): every other study would meet the same refusal.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from osteogate.gateway.core.dicomnet import (
    AssociationError,
    Outcome,
    Peer,
    association,
    client_ae,
    describe_rejection,
    rejection_outcome,
    response_status,
    response_text,
    status_outcome,
)
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

# What the gateway screens (gateway/receive/validation.py ACCEPTED_SOP_CLASSES): C-GET asks for these.
IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
)
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                     JPEG2000Lossless, JPEG2000, RLELossless]
MOVE_DESTINATION_UNKNOWN = 0xA801


class MoveDestinationUnknown(Exception):
    """The PACS refused the C-MOVE destination: OsteoGate is not registered there."""


@dataclass(frozen=True)
class Retrieved:
    """How one retrieve ended."""

    outcome: Outcome  # SUCCESS / WARNING (received), TRANSIENT (retry), PERMANENT (give up)
    detail: str
    completed: int = 0
    failed: int = 0

    @property
    def received(self) -> bool:
        return self.outcome.ok

    @property
    def nothing_sent(self) -> bool:
        """Refused before a single sub-operation: what Orthanc (0xC000) and others answer for a
        move destination they do not know, without saying so."""
        return not self.outcome.ok and self.completed == 0 and self.failed == 0


def _suboperations(response: Dataset | None) -> tuple[int, int]:
    if response is None:
        return 0, 0
    return (int(response.get("NumberOfCompletedSuboperations", 0) or 0),
            int(response.get("NumberOfFailedSuboperations", 0) or 0))


def judge(final: Dataset | None, completed: int, failed: int) -> Retrieved:
    """What a C-MOVE / C-GET final status means for the backfill (PS3.4 C.4.2.1.5, C.4.3.1.4)."""
    code = response_status(final)
    text = response_text(final)
    if code == MOVE_DESTINATION_UNKNOWN:
        raise MoveDestinationUnknown(text)
    if code == 0x0000:
        return Retrieved(Outcome.SUCCESS, text, completed, failed)
    if code == 0xB000:  # some sub-operations failed: the gateway dedups, so fetch again later
        return Retrieved(Outcome.TRANSIENT, f"{text}: {failed} of {completed + failed} instance(s) failed",
                         completed, failed)
    if code is not None and (code & 0xF000) == 0xC000:
        # "Unable to process": often a PACS busy fetching from its own long-term archive.
        return Retrieved(Outcome.TRANSIENT, text, completed, failed)
    return Retrieved(status_outcome(code), text, completed, failed)


def move_identifier(study_uid: str, series_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    return ds


def _targets(study_uid: str, series_uids: Sequence[str] | None) -> list[Dataset]:
    return [move_identifier(study_uid, s) for s in series_uids] if series_uids else [move_identifier(study_uid)]


def _combine(results: list[Retrieved]) -> Retrieved:
    """Several series of one study: the worst outcome stands, the counts add up."""
    order = [Outcome.PERMANENT, Outcome.TRANSIENT, Outcome.WARNING, Outcome.SUCCESS]
    worst = min(results, key=lambda r: order.index(r.outcome))
    return Retrieved(worst.outcome, worst.detail, sum(r.completed for r in results), sum(r.failed for r in results))


def c_move(peer: Peer, calling_aet: str, destination_aet: str, study_uid: str,
           series_uids: Sequence[str] | None, timeout: float) -> Retrieved:
    """C-MOVE the study (or only its fitting series) to ``destination_aet``."""
    ae = client_ae(calling_aet, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    results: list[Retrieved] = []
    try:
        with association(ae, peer) as assoc:
            for identifier in _targets(study_uid, series_uids):
                final = None
                for status, _ in assoc.send_c_move(identifier, destination_aet,
                                                   StudyRootQueryRetrieveInformationModelMove):
                    if status is None or "Status" not in status or response_status(status) not in (0xFF00,):
                        final = status
                results.append(judge(final, *_suboperations(final)))
    except AssociationError as exc:
        return Retrieved(exc.outcome, exc.detail)
    return _combine(results)


def c_get(peer: Peer, calling_aet: str, study_uid: str, series_uids: Sequence[str] | None, timeout: float,
          into: Path) -> tuple[Retrieved, list[Path]]:
    """C-GET the study into the folder ``into``; returns the outcome and the files written."""
    ae = client_ae(calling_aet, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in IMAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
        roles.append(build_role(sop_class, scp_role=True))
    files: list[Path] = []

    def on_store(event: evt.Event) -> int:
        path = into / f"{len(files):06d}.dcm"
        with path.open("wb") as handle:
            handle.write(event.encoded_dataset())
        files.append(path)
        return 0x0000

    results: list[Retrieved] = []
    try:
        with _get_association(ae, peer, roles, on_store) as assoc:
            for identifier in _targets(study_uid, series_uids):
                final = None
                for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                    if status is None or response_status(status) != 0xFF00:
                        final = status
                completed, failed = _suboperations(final)
                result = judge(final, completed, failed)
                if result.outcome is Outcome.TRANSIENT and completed and response_status(final) == 0xB000:
                    # Objects we did not ask for (SR, PDF...) are refused by design: what the
                    # gateway screens came.
                    result = Retrieved(Outcome.WARNING, result.detail, completed, failed)
                results.append(result)
    except AssociationError as exc:
        return Retrieved(exc.outcome, exc.detail), files
    return _combine(results), files


@contextmanager
def _get_association(ae: AE, peer: Peer, roles: list[Any], handler: Callable[[evt.Event], int]) -> Iterator[Any]:
    """``association`` with the SCP/SCU role selection and the C-STORE handler C-GET needs."""
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, handler)])
    if not assoc.is_established:
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            raise AssociationError(f"association {describe_rejection(primitive)}",
                                   rejection_outcome(getattr(primitive, "result", None)))
        raise AssociationError(f"no association with {peer}: connection refused, aborted or timed out",
                               Outcome.TRANSIENT)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def forward(files: Sequence[Path], peer: Peer, calling_aet: str, timeout: float) -> Retrieved:
    """C-STORE files (C-GET or WADO-RS results) to the gateway's listener, each in its own
    transfer syntax."""
    if not files:
        return Retrieved(Outcome.PERMANENT, "the PACS sent no image the gateway screens")
    headers: dict[Path, tuple[UID, UID]] = {}
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(path, stop_before_pixels=True)
        headers[path] = (UID(str(header.SOPClassUID)), UID(str(header.file_meta.TransferSyntaxUID)))
    ae = client_ae(calling_aet, timeout)
    for context in sorted(set(headers.values())):
        ae.add_requested_context(*context)
    completed = failed = 0
    detail = "forwarded"
    try:
        with association(ae, peer) as assoc:
            for path in files:
                response = assoc.send_c_store(path)
                if status_outcome(response_status(response)).ok:
                    completed += 1
                else:
                    failed += 1
                    detail = f"the gateway refused an instance: {response_text(response)}"
    except AssociationError as exc:
        return Retrieved(exc.outcome, f"forwarding to the gateway: {exc.detail}", completed, failed)
    return Retrieved(Outcome.SUCCESS if not failed else Outcome.TRANSIENT, detail, completed, failed)


def scratch_dir(parent: Path) -> tempfile.TemporaryDirectory[str]:
    """A folder for C-GET / WADO-RS results on their way to the gateway, removed afterwards."""
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="backfill-", dir=parent)
