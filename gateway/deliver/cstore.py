"""C-STORE SCU for deliveries: a result's files over one association, outcome classified by
gateway.core.dicomnet's rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pydicom
from osteogate.gateway.core.config import Destination, TlsConfig
from osteogate.gateway.core.dicomnet import (
    AssociationError,
    Outcome,
    association,
    client_ae,
    response_status,
    response_text,
    status_outcome,
)
from osteogate.gateway.deliver.outcome import SendOutcome
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian


def send_file(
    path: str | Sequence[str], destination: Destination, calling_aet: str, timeout: float = 30,
    tls: TlsConfig | None = None,
) -> SendOutcome:
    """C-STORE one file, or a result's files over one association, to one destination; classify the
    outcome as ok / transient / permanent (gateway.dicomnet's rules).

    All or retry: any failed C-STORE makes the whole set be sent again later, so a PACS never keeps
    half a report. The first file (the SR) is the report: a peer that refuses its SOP class gets
    nothing. A later one (the result card) whose SOP class the peer refuses at negotiation is left
    out, and the outcome says so: an SR-only archive still gets its SR."""
    datasets = [pydicom.dcmread(p) for p in ([path] if isinstance(path, str) else path)]
    ae = client_ae(calling_aet, timeout)
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    response: Any = None
    try:
        with association(ae, destination, tls) as assoc:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            if str(datasets[0].SOPClassUID) not in accepted:
                return SendOutcome(False, permanent=True,
                                   detail=f"{destination.ae_title} accepts no presentation context for "
                                          f"{datasets[0].SOPClassUID.name}; nothing sent")
            left_out = sorted({ds.SOPClassUID.name for ds in datasets[1:] if str(ds.SOPClassUID) not in accepted})
            for ds in datasets:
                if str(ds.SOPClassUID) in accepted:
                    response = assoc.send_c_store(ds)
                    if not status_outcome(response_status(response)).ok:
                        break
    except AssociationError as exc:
        return SendOutcome(False, permanent=exc.outcome == Outcome.PERMANENT, detail=exc.detail)
    outcome = status_outcome(response_status(response))
    if outcome.ok:
        note = f"; not accepted by the peer, left out: {', '.join(left_out)}" if left_out else ""
        return SendOutcome(True, permanent=False, detail=f"stored: {response_text(response)}{note}")
    return SendOutcome(False, permanent=outcome == Outcome.PERMANENT, detail=f"C-STORE failed: {response_text(response)}")
