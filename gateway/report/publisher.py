"""The report stage's side of the worker: a result becomes its SR (TID 1500), then its result
card (Secondary Capture), durably written under reports/ before any delivery row points at them."""

from __future__ import annotations

from datetime import datetime
from io import BytesIO
from typing import Any

import pydicom
from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.outcome import MadeObject, StudyOutcome
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

log = get_logger("osteogate.gateway.report.publisher")


def sr_series_uid(study_uid: str) -> str:
    """One SR series per study, stable across versions, so PACS shows the versions together.

    Parameters
    ----------
    study_uid : str
        The study.

    Returns
    -------
    str
    """
    return generate_uid(entropy_srcs=[study_uid, "osteogate-result-series"])


def card_series_uid(study_uid: str) -> str:
    """The result cards' own series: stable across versions, like the SR's.

    Parameters
    ----------
    study_uid : str
        The study.

    Returns
    -------
    str
    """
    return generate_uid(entropy_srcs=[study_uid, "osteogate-result-card-series"])


class ReportPublisher:
    """Makes and writes a result's objects; the worker calls :meth:`publish` (work.outcome.Publisher).

    Parameters
    ----------
    settings : Settings
        The gateway settings (``report.result_card`` decides whether a card is made).
    reports : Spool
        The reports folder the objects are written to.
    """

    def __init__(self, settings: Settings, reports: Spool) -> None:
        self.settings = settings
        self.reports = reports
        if settings.report.result_card:
            self.check_card_font()

    @staticmethod
    def check_card_font() -> None:
        """Say at start, once, when result cards cannot be drawn (each job would log it again)."""
        from osteogate.gateway.report.card import FontUnavailable, find_font

        try:
            find_font()
        except FontUnavailable as exc:
            log.error("result_card_unavailable", detail=str(exc))

    def publish(self, study_uid: str, outcome: StudyOutcome, classifier: Any, version: int,
                previous_sr: str | None) -> list[MadeObject]:
        """Build and durably write the result's objects (SR, then card), in send order.

        Parameters
        ----------
        study_uid : str
            The study the result belongs to.
        outcome : StudyOutcome
            The work stage's outcome, with its assessment.
        classifier : Any
            The classifier that made it (its card names the algorithm).
        version : int
            The result version (the objects' InstanceNumber).
        previous_sr : str or None
            The reports-relative path of the newest SR sent before, the predecessor of this one.

        Returns
        -------
        list of MadeObject
            The objects written, SR first.
        """
        predecessor = self._read_header(previous_sr) if previous_sr else None
        return self.write_report(study_uid, outcome, classifier, version, predecessor)

    def study_report(self, outcome: StudyOutcome, classifier: Any) -> Any:
        """What the SR and the result card are made from (gateway.sr.StudyReport)."""
        from osteogate.gateway.report.sr import AlgorithmInfo, SkippedImage, StudyReport

        assert outcome.assessment is not None
        card = classifier.card
        algorithm = AlgorithmInfo(name=card.display_name, version=card.version, checkpoint_sha256=classifier.sha256)
        scored = outcome.scored
        skipped = tuple(SkippedImage(source=i.header, reason=i.skip_reason or "not classified")
                        for i in outcome.images if i.score is None and "StudyInstanceUID" in i.header)
        thumbnails = tuple(i.thumbnail for i in scored) if self.settings.report.result_card else ()
        return StudyReport(outcome.assessment, tuple(i.header for i in scored), algorithm, skipped, thumbnails)

    def build_report(self, report: Any, series_uid: str, sr_uid: str, version: int,
                     predecessor: Dataset | None, when: datetime | None = None) -> Dataset:
        """The result SR (TID 1500) of one version."""
        from osteogate.gateway.report.sr import build_result_sr

        return build_result_sr(report, series_instance_uid=series_uid, sop_instance_uid=sr_uid,
                               instance_number=version, predecessor=predecessor, content_datetime=when)

    def build_card(self, report: Any, series_uid: str, card_uid: str, version: int,
                   when: datetime | None = None) -> Dataset:
        """The result card (Secondary Capture) of one version: same series across versions."""
        from osteogate.gateway.report.card import build_result_card

        return build_result_card(report, series_instance_uid=series_uid, sop_instance_uid=card_uid,
                                 instance_number=version, content_datetime=when)

    def write_report(self, study_uid: str, outcome: StudyOutcome, classifier: Any, version: int,
                     predecessor: Dataset | None) -> list[MadeObject]:
        """Build and durably write the SR, then the result card; returns them in send order.

        A card that cannot be made (e.g. no font on this host) is logged and left out: the SR is a
        complete report on its own, and a card problem must not withhold the result."""
        report = self.study_report(outcome, classifier)
        when = datetime.now()
        made = []
        sr_uid = generate_uid()
        sr = self.build_report(report, sr_series_uid(study_uid), sr_uid, version, predecessor, when)
        made.append(self._write("sr", sr, study_uid))
        if self.settings.report.result_card:
            try:
                card = self.build_card(report, card_series_uid(study_uid), generate_uid(), version, when)
            except Exception as exc:  # noqa: BLE001 - the SR still goes; the reason is logged
                log.error("result_card_failed", error=type(exc).__name__, detail=str(exc)[:200]
                          if type(exc).__name__ == "FontUnavailable" else None)
            else:
                made.append(self._write("card", card, study_uid))
        return made

    def _write(self, kind: str, ds: Dataset, study_uid: str) -> MadeObject:
        relative = self.reports.report_path(study_uid, str(ds.SOPInstanceUID)).as_posix()
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        self.reports.write_atomic(relative, buffer.getvalue())
        return MadeObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), relative)

    def _read_header(self, relative: str) -> Dataset | None:
        try:
            return pydicom.dcmread(self.reports.absolute(relative), stop_before_pixels=True)
        except Exception:
            return None
