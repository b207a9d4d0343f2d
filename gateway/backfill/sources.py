"""Where a backfill reads from: a DICOM Q/R peer (``AET@HOST:PORT``) or a DICOMweb service
(``https://host/dicom-web``). Both answer the same two questions: which studies match a chunk,
and bring this study to the gateway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from osteogate.gateway.backfill.query import Chunk, Filters, FoundStudy, StudyFinder
from osteogate.gateway.backfill.retrieve import Retrieved, c_get, c_move, forward, scratch_dir
from osteogate.gateway.core.dicomnet import Peer, client_ae, open_association
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind


class Source(Protocol):
    """What the engine needs from an archive."""

    name: str

    def studies(self, chunk: Chunk, on_capped: Callable[[Chunk], None]) -> Iterator[FoundStudy]: ...

    def retrieve(self, study_uid: str, series_uids: list[str] | None) -> Retrieved: ...


class DimseSource:
    """C-FIND / C-MOVE (or C-GET) against one PACS, as the Study Root Q/R SCU."""

    def __init__(self, peer: Peer, calling_aet: str, filters: Filters, *, move_destination: str,
                 forward_to: Peer, method: str = "move", timeout: float = 120, find_limit: int = 0,
                 scratch: Path = Path("/tmp")) -> None:
        self.peer = peer
        self.name = str(peer)
        self.calling_aet = calling_aet
        self.move_destination = move_destination
        self.forward_to = forward_to
        self.method = method
        self.timeout = timeout
        self.scratch = scratch
        self.finder = StudyFinder(self._associate, peer, filters, find_limit, calling_aet)

    def _associate(self) -> Association:
        ae = client_ae(self.calling_aet, self.timeout)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        return open_association(ae, self.peer)

    def studies(self, chunk: Chunk, on_capped: Callable[[Chunk], None]) -> Iterator[FoundStudy]:
        return self.finder.studies(chunk, on_capped)

    def retrieve(self, study_uid: str, series_uids: list[str] | None) -> Retrieved:
        if self.method == "move":
            return c_move(self.peer, self.calling_aet, self.move_destination, study_uid, series_uids, self.timeout)
        with scratch_dir(self.scratch) as folder:
            result, files = c_get(self.peer, self.calling_aet, study_uid, series_uids, self.timeout, Path(folder))
            if not result.received:
                return result
            sent = forward(files, self.forward_to, self.calling_aet, self.timeout)
            return sent if not sent.received else result
