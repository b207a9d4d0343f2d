"""A DICOMweb archive (``--from https://host/dicom-web``): QIDO-RS to find, WADO-RS to fetch
(PS3.18 10.6, 10.4), through dicomweb-client. What WADO-RS returns is forwarded to the gateway's
own listener by C-STORE, so it is received, checked and screened like anything else.

QIDO answers are paged (``limit``/``offset``) instead of split by date: DICOMweb servers cap a
page, not the query.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from osteogate.gateway.backfill.query import Chunk, Filters, FindError, FoundStudy
from osteogate.gateway.backfill.retrieve import Retrieved, forward, scratch_dir
from osteogate.gateway.core.dicomnet import Outcome, Peer
from osteogate.gateway.core.errors import ConfigurationError
from osteogate.gateway.core.logs import get_logger
from pydicom.dataset import Dataset

log = get_logger("osteogate.gateway.backfill.dicomweb")
PAGE = 100


def _value(item: dict[str, Any], keyword_tag: str) -> list[Any]:
    return list((item.get(keyword_tag) or {}).get("Value") or [])


def _first(item: dict[str, Any], tag: str) -> str:
    values = _value(item, tag)
    return str(values[0]) if values else ""


def web_session(username: str = "", password_env: str = "", token_env: str = "", ca_file: str = "") -> requests.Session:
    """A requests session for the archive: HTTP basic or bearer authentication with the secret read
    from the environment at start, HTTPS verified (against ``ca_file`` when given)."""
    session = requests.Session()
    if token_env:
        token = os.environ.get(token_env, "")
        if not token:
            raise ConfigurationError("backfill.source_token_env", f"the environment variable {token_env} is empty or unset")
        session.headers["Authorization"] = f"Bearer {token}"
    elif username:
        password = os.environ.get(password_env, "") if password_env else ""
        if password_env and not password:
            raise ConfigurationError("backfill.source_password_env",
                                     f"the environment variable {password_env} is empty or unset")
        session.auth = (username, password)
    if ca_file:
        session.verify = ca_file
    return session


class DicomwebSource:
    """QIDO-RS / WADO-RS against one DICOMweb root."""

    def __init__(self, url: str, filters: Filters, *, forward_to: Peer, calling_aet: str, timeout: float = 120,
                 scratch: Path = Path("/tmp"), session: requests.Session | None = None) -> None:
        self.name = url.rstrip("/")
        self.filters = filters
        self.forward_to = forward_to
        self.calling_aet = calling_aet
        self.timeout = timeout
        self.scratch = scratch
        self.client = DICOMwebClient(self.name, session=session, timeout=timeout)
        # dicomweb-client retries 5 times from 2 s up (31 s for a refused connection); a failed
        # query stops the run, which resumes when run again, so a short retry is enough here.
        self.client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)

    def _search(self, call: Callable[..., list[dict[str, Any]]], **kwargs: Any) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            try:
                page = call(limit=PAGE, offset=offset, **kwargs)
            except requests.HTTPError as exc:
                # Not str(exc): it quotes the query URL, and with --patients that names a patient.
                code = exc.response.status_code if exc.response is not None else "?"
                raise FindError(f"QIDO-RS to {self.name}: HTTP {code}") from None
            except (requests.RequestException, OSError) as exc:
                raise FindError(f"QIDO-RS to {self.name}: {_why(exc, self.timeout)}") from None
            yield from page
            if len(page) < PAGE:
                return
            offset += len(page)

    def studies(self, chunk: Chunk, on_capped: Callable[[Chunk], None]) -> Iterator[FoundStudy]:
        search: dict[str, Any] = {}
        if chunk.date_range():
            search["StudyDate"] = chunk.date_range()
        if chunk.patient:
            search["PatientID"] = chunk.patient[0]
            if chunk.patient[1]:
                search["IssuerOfPatientID"] = chunk.patient[1]
        fields = ["StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]
        for item in self._search(self.client.search_for_studies, search_filters=search, fields=fields):
            uid = _first(item, "0020000D")
            if not uid:
                continue
            modalities = tuple(str(m).upper() for m in _value(item, "00080061"))
            if modalities and self.filters.modalities and not any(self.filters.modality_fits(m) for m in modalities):
                continue
            count = _first(item, "00201208")
            study = FoundStudy(uid, _first(item, "00080020"), modalities, int(count) if count.isdigit() else None)
            if self.filters.body_parts or (self.filters.modalities and not modalities):
                self._check_series(study)
            yield study

    def _check_series(self, study: FoundStudy) -> None:
        series = list(self._search(self.client.search_for_series, study_instance_uid=study.study_uid,
                                   fields=["SeriesInstanceUID", "Modality", "BodyPartExamined"]))
        fitting = [_first(s, "0020000E") for s in series
                   if self.filters.modality_fits(_first(s, "00080060"))
                   and self.filters.body_part_fits(_first(s, "00180015"))]
        study.modalities = study.modalities or tuple(sorted({_first(s, "00080060").upper() for s in series} - {""}))
        if not fitting:
            study.skip_reason = "no series fits the modality / body part filters"
        elif len(fitting) < len(series):
            study.series_uids = fitting

    def retrieve(self, study_uid: str, series_uids: list[str] | None) -> Retrieved:
        try:
            datasets: list[Dataset] = []
            if series_uids:
                for series_uid in series_uids:
                    datasets += self.client.retrieve_series(study_uid, series_uid)
            else:
                datasets = self.client.retrieve_study(study_uid)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            transient = code is None or code >= 500 or code in (408, 429)
            return Retrieved(Outcome.TRANSIENT if transient else Outcome.PERMANENT, f"WADO-RS: HTTP {code}")
        except (requests.RequestException, OSError) as exc:
            return Retrieved(Outcome.TRANSIENT, f"WADO-RS: {type(exc).__name__}")
        with scratch_dir(self.scratch) as folder:
            files = []
            for n, ds in enumerate(datasets):
                path = Path(folder) / f"{n:06d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
            return forward(files, self.forward_to, self.calling_aet, self.timeout)


def _why(exc: BaseException, timeout: float) -> str:
    """What went wrong, in words, without quoting the exception (its text holds the query URL,
    which names a patient under --patients)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed (is ca_file the CA that signed the server's certificate?)"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if "refused" in str(exc).lower():
        return "connection refused (nothing listens there: is the server up, the URL right?)"
    return f"{type(exc).__name__} (no answer)"
