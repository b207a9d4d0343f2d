"""What to fetch: the C-FIND side of a backfill (Study Root Query/Retrieve, PS3.4 C.6.2).

Study level first (date range, ModalitiesInStudy, PatientID), then series level for the studies
whose series must be checked (body part, or a PACS that does not answer ModalitiesInStudy).
Long date ranges are asked in chunks; a chunk whose answer looks capped (the PACS stopped early:
a non-success final status after matches, or exactly ``find_limit`` matches) is halved until it is
one day.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta

from osteogate.gateway.core.dicomnet import AssociationError, Peer, response_status, status_text
from osteogate.gateway.core.logs import get_logger, hashed
from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

log = get_logger("osteogate.gateway.backfill.query")


@dataclass(frozen=True)
class Filters:
    """What a backfill looks for. Dates are ``YYYYMMDD`` ('' = open)."""

    since: str = ""
    until: str = ""
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    patients: tuple[tuple[str, str], ...] = ()  # (PatientID, IssuerOfPatientID or '')

    def modality_fits(self, modality: str) -> bool:
        return not self.modalities or modality.upper() in self.modalities

    def body_part_fits(self, body_part: str) -> bool:
        # Sites write LSPINE, L-SPINE, SPINE...: a wanted word inside the stored value fits.
        value = body_part.upper().replace("-", "").replace(" ", "")
        return not self.body_parts or any(part.replace("-", "") in value for part in self.body_parts)


@dataclass
class FoundStudy:
    """One study a query matched: no patient data kept beyond the query itself."""

    study_uid: str
    study_date: str = ""
    modalities: tuple[str, ...] = ()
    instances: int | None = None
    series_uids: list[str] | None = None  # only these series fit; None: the whole study
    skip_reason: str | None = None  # matched the study query but nothing in it fits


@dataclass(frozen=True)
class Chunk:
    """One C-FIND: a date range (inclusive) and optionally one patient."""

    start: date | None
    end: date | None
    patient: tuple[str, str] | None = None

    @property
    def key(self) -> str:
        """Names the chunk in SQL (chunks done), logs and warnings: the patient only as a salted hash."""
        days = f"{self.start:%Y%m%d}-{self.end:%Y%m%d}" if self.start and self.end else "all"
        return days if self.patient is None else f"{days}|patient {hashed('^'.join(self.patient))}"

    def halves(self) -> list[Chunk] | None:
        if self.start is None or self.end is None or self.start >= self.end:
            return None
        middle = self.start + (self.end - self.start) // 2
        return [Chunk(self.start, middle, self.patient), Chunk(middle + timedelta(days=1), self.end, self.patient)]

    def date_range(self) -> str:
        if self.start is None and self.end is None:
            return ""
        return f"{self.start:%Y%m%d}" if self.start == self.end else \
            f"{self.start:%Y%m%d}-{self.end:%Y%m%d}" if self.start and self.end else ""


def _day(text: str) -> date | None:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if text else None


def plan_chunks(filters: Filters, chunk_days: int, today: date | None = None) -> list[Chunk]:
    """The C-FINDs to ask, oldest first. Without ``since`` the date is not restricted (one query
    per patient, or one query, halved by date only if it comes back capped from 1900 onwards)."""
    end = _day(filters.until) or today or date.today()
    start = _day(filters.since)
    patients: Sequence[tuple[str, str] | None] = filters.patients or [None]
    chunks: list[Chunk] = []
    for patient in patients:
        if start is None:
            chunks.append(Chunk(date(1900, 1, 1) if patient is None else None,
                                end if patient is None else None, patient))
            continue
        if patient is not None:  # one patient: a handful of studies, one query over the whole range
            chunks.append(Chunk(start, end, patient))
            continue
        cursor = start
        while cursor <= end:
            last = min(cursor + timedelta(days=chunk_days - 1), end)
            chunks.append(Chunk(cursor, last, patient))
            cursor = last + timedelta(days=1)
    return chunks


def study_identifier(chunk: Chunk, filters: Filters) -> Dataset:
    """Study-level C-FIND keys: the matching keys set, the return keys empty."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.StudyDate = chunk.date_range()
    ds.ModalitiesInStudy = "\\".join(filters.modalities)
    ds.NumberOfStudyRelatedInstances = ""
    ds.PatientID = chunk.patient[0] if chunk.patient else ""
    if chunk.patient and chunk.patient[1]:
        ds.IssuerOfPatientID = chunk.patient[1]
    return ds


def series_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.BodyPartExamined = ""
    ds.NumberOfSeriesRelatedInstances = ""
    return ds


class FindError(Exception):
    """A C-FIND that failed outright (no usable answer): ``detail`` says why."""


@dataclass
class FindAnswer:
    matches: list[Dataset] = field(default_factory=list)
    status: int | None = 0

    @property
    def complete(self) -> bool:
        return self.status == 0x0000


def c_find(assoc: Association, identifier: Dataset) -> FindAnswer:
    """Send one C-FIND; collect the pending answers and the final status."""
    answer = FindAnswer()
    for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        code = response_status(status)
        if code in (0xFF00, 0xFF01):
            if found is not None:
                answer.matches.append(found)
            continue
        answer.status = code
    return answer


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


class StudyFinder:
    """Asks one PACS over an open association (``associate`` opens a fresh one per query)."""

    def __init__(self, associate: Callable[[], Association], peer: Peer, filters: Filters, find_limit: int = 0,
                 calling_aet: str = "") -> None:
        self.associate = associate
        self.calling_aet = calling_aet
        self.peer = peer
        self.filters = filters
        self.find_limit = find_limit

    def _find(self, identifier: Dataset) -> FindAnswer:
        try:
            assoc = self.associate()
        except AssociationError as exc:  # refused, rejected, unreachable: said in words, not a bug
            raise FindError(exc.detail) from None
        try:
            answer = c_find(assoc, identifier)
        finally:
            if assoc.is_established:
                assoc.release()
        if answer.status is None:
            raise FindError(f"C-FIND to {self.peer}: no answer (timeout or association aborted; PACS abort "
                            f"queries from AE titles they do not know: is {self.calling_aet} registered there?)")
        if not answer.complete and not answer.matches:
            raise FindError(f"C-FIND to {self.peer} refused: {status_text(answer.status)}")
        return answer

    def capped(self, answer: FindAnswer) -> bool:
        return (not answer.complete) or (self.find_limit > 0 and len(answer.matches) >= self.find_limit)

    def studies(self, chunk: Chunk, on_capped: Callable[[Chunk], None] = lambda c: None) -> Iterator[FoundStudy]:
        """The studies of one chunk, splitting it while the PACS caps its answer."""
        pending = [chunk]
        while pending:
            current = pending.pop(0)
            answer = self._find(study_identifier(current, self.filters))
            if self.capped(answer):
                halves = current.halves()
                if halves:
                    log.info("backfill_find_capped", chunk=current.key, matches=len(answer.matches),
                             status=status_text(answer.status))
                    pending[:0] = halves
                    continue
                on_capped(current)  # one day, still capped: report it, keep what came
            for match in answer.matches:
                study = self._study(match)
                if study is not None:
                    yield study

    def _study(self, match: Dataset) -> FoundStudy | None:
        uid = str(match.get("StudyInstanceUID", "") or "").strip()
        if not uid:
            return None
        raw = match.get("ModalitiesInStudy")
        values = [raw] if isinstance(raw, str) else list(raw or [])  # one value comes as a str
        modalities = tuple(str(m).strip().upper() for m in values if str(m).strip())
        study = FoundStudy(uid, str(match.get("StudyDate", "") or ""), modalities,
                           _int(match.get("NumberOfStudyRelatedInstances")))
        if modalities and self.filters.modalities and not any(self.filters.modality_fits(m) for m in modalities):
            return None  # the PACS ignored the ModalitiesInStudy key: filter here
        if self.filters.body_parts or (self.filters.modalities and not modalities):
            self._check_series(study)
        return study

    def _check_series(self, study: FoundStudy) -> None:
        """Series level: which series fit the modality and body part; the study keeps only those."""
        answer = self._find(series_identifier(study.study_uid))
        fitting: list[str] = []
        instances = 0
        seen_modalities: set[str] = set()
        for series in answer.matches:
            modality = str(series.get("Modality", "") or "")
            body_part = str(series.get("BodyPartExamined", "") or "")
            seen_modalities.add(modality.upper())
            if self.filters.modality_fits(modality) and self.filters.body_part_fits(body_part):
                fitting.append(str(series.SeriesInstanceUID))
                instances += _int(series.get("NumberOfSeriesRelatedInstances")) or 0
        study.modalities = study.modalities or tuple(sorted(m for m in seen_modalities if m))
        if not fitting:
            study.skip_reason = "no series fits the modality / body part filters"
        elif len(fitting) < len(answer.matches):
            study.series_uids = fitting
            study.instances = instances or None
