"""Delivery by DICOMweb STOW-RS (PS3.18 10.5), with dicomweb-client.

One delivery attempt POSTs the result objects of one study (the SR, and the result card when
there is one) in a single multipart request to ``{url}/studies/{StudyInstanceUID}``, so the
server itself checks that every object belongs to that study. The outcome is classified as
C-STORE outcomes are (gateway/deliver/delivery.py), so the same retry and backoff rules apply:

* 2xx without failed instances: delivered (a 202 with warnings only is a success, as a C-STORE
  warning status is);
* connection errors (refused, reset, TLS handshake) and timeouts: transient, retried;
* HTTP 408, 429 and 5xx: transient, retried;
* any other 4xx (bad request, authentication, not found, conflict...): permanent; an
  administrator fixes the cause and runs ``osteogate resend``;
* a response with a FailedSOPSequence (PS3.18 Table 10.5.3-3) is a failure whose reasons are
  read out; it is transient only where a reason is "out of resources" (0xA7xx) or the HTTP
  status itself says so.

The library's own retry loop is switched off: it would block the delivery thread for seconds
and forget everything on a restart, where the deliveries table does not.
"""

from __future__ import annotations

import html
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import requests
import requests.adapters
import urllib3
from dicomweb_client.api import DICOMwebClient
from osteogate.gateway.core.config import Destination
from osteogate.gateway.core.logs import hashed
from osteogate.gateway.deliver.outcome import SendOutcome
from pydicom.uid import UID
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

# dicomweb-client logs study and SOP Instance UIDs at info and error level; identifiers stay
# out of our logs (the outcome detail below says what failed without them).
logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)

TRANSIENT_HTTP_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests
_FAILED_SOP_SEQUENCE = "FailedSOPSequence"
_MAX_BODY_IN_DETAIL = 200


class SecretUnavailable(RuntimeError):
    """A configured password/token file or environment variable cannot be read."""


@dataclass(frozen=True)
class Credentials:
    """What one request authenticates with: basic (username, password) or a bearer token."""

    username: str | None = None
    password: str | None = None
    token: str | None = None


def _read_secret(inline: Any, path: Path | None, variable: str | None, what: str) -> str | None:
    if inline is not None:
        return str(inline.get_secret_value())
    if path is not None:
        try:
            # A secret file holds just the secret; a trailing newline from an editor is not part of it.
            return Path(path).read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise SecretUnavailable(f"{what}_file {path}: {exc.strerror or exc}") from None
    if variable is not None:
        value = os.environ.get(variable)
        if value is None:
            raise SecretUnavailable(f"{what}_env: environment variable {variable} is not set")
        return value
    return None


def credentials(destination: Destination) -> Credentials:
    """Read the destination's secrets now (files and variables may change while we run)."""
    password = _read_secret(destination.password, destination.password_file, destination.password_env, "password")
    token = _read_secret(destination.token, destination.token_file, destination.token_env, "token")
    return Credentials(destination.username, password, token)


def base_url(destination: Destination) -> str:
    """The DICOMweb service root: the configured STOW URL without its ``/studies`` resource."""
    assert destination.url is not None
    url = destination.url.rstrip("/")
    return url[: -len("/studies")] if url.endswith("/studies") else url


# An answer to a STOW-RS or QIDO-RS request is a small JSON document: anything bigger, or still
# arriving after the timeout, is a misbehaving server (or one streaming forever), cut off.
MAX_ANSWER_BYTES = 4 * 2**20


class AnswerCut(requests.RequestException):
    """The server's answer was larger than MAX_ANSWER_BYTES or not complete within the timeout."""


class RedirectRefused(requests.RequestException):
    """The server answered 3xx: not followed (the results would go to another URL, maybe another
    host, with the credentials); the configured URL is to be corrected instead."""

    def __init__(self, status: int, reason: str, location: str) -> None:
        target = urllib3.util.parse_url(location) if location else None
        # Scheme and host only: a path may carry the Study Instance UID.
        where = f"{target.scheme or 'http'}://{target.host}" if target and target.host else "a relative URL"
        super().__init__(f"STOW-RS HTTP {status} {reason}: redirect to {where} not followed; set the "
                         "destination URL to the address the server names")


def _refuse_redirects(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    # A response hook runs before requests would follow the redirect.
    if 300 <= response.status_code < 400:
        response.close()
        raise RedirectRefused(response.status_code, response.reason or "", response.headers.get("Location", ""))


class _BoundedAdapter(requests.adapters.HTTPAdapter):
    """Reads each answer with a size cap and an overall deadline (requests' own timeout bounds
    each read, not the whole body: a server trickling bytes would hold the delivery lane forever),
    and, where ``verify`` is given, sends with that TLS verification whatever the environment says."""

    def __init__(self, timeout: float, verify: bool | str | None = None) -> None:
        super().__init__()
        self._timeout = timeout
        self._verify = verify

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self._verify is not None:
            kwargs["verify"] = self._verify
        kwargs["stream"] = True
        response = super().send(request, **kwargs)
        deadline = time.monotonic() + self._timeout
        body = bytearray()
        try:
            # requests leaves decoding (gzip) to its own reader; this one decodes as it reads.
            while chunk := response.raw.read1(65536, decode_content=True):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise AnswerCut(f"answer larger than {MAX_ANSWER_BYTES // 2**20} MB, cut off")
                if time.monotonic() > deadline:
                    raise AnswerCut(f"answer not complete within {self._timeout:g} s, cut off")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            response.close()
            raise requests.ConnectionError(f"answer broken off: {exc}") from None
        except AnswerCut:
            response.close()
            raise
        response._content = bytes(body)
        response._content_consumed = True
        response.close()
        return response


def make_client(destination: Destination, timeout: float) -> DICOMwebClient:
    """A DICOMweb client for one destination: its TLS verification, authentication and timeout."""
    secrets = credentials(destination)
    session = requests.Session()
    verify: bool | str | None = None
    if destination.ca_file is not None or not destination.tls_verify:
        # ca_file (a site's own CA) or tls_verify = false (an explicit opt-out) must win over
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE, which requests otherwise prefers to session.verify.
        verify = str(destination.ca_file) if destination.ca_file else False
        if verify is False:  # chosen in the configuration: not a warning on every send
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    session.mount("https://", _BoundedAdapter(timeout, verify))
    session.mount("http://", _BoundedAdapter(timeout))
    session.hooks["response"].append(_refuse_redirects)
    session.max_redirects = 0  # belt and braces: the hook above refuses them first
    headers = {"Accept": "application/dicom+json"}
    if secrets.username is not None and secrets.password is not None:
        session.auth = (secrets.username, secrets.password)
    elif secrets.token is not None:
        headers["Authorization"] = f"Bearer {secrets.token}"
    client = DICOMwebClient(url=base_url(destination), session=session, headers=headers,
                            timeout=(timeout, timeout))
    client.set_http_retry_params(retry=False)
    # The multipart body is built in memory anyway; above chunk_size dicomweb-client switches to
    # chunked transfer encoding, which some servers and proxies refuse. Always send a length.
    client.set_chunk_size(2**31)
    return client


# -- outcome classification (pure decision logic) -------------------------------------------------


def http_status_is_permanent(status: int) -> bool:
    """HTTP 408/429 and 5xx are worth retrying; every other non-2xx answer will be the same again."""
    return not (status in TRANSIENT_HTTP_4XX or 500 <= status <= 599)


def failure_reason_text(code: int) -> str:
    """``0xA700 (Refused: Out of Resources)`` for a STOW FailureReason (C-STORE status codes)."""
    for table in (STORAGE_SERVICE_CLASS_STATUS, GENERAL_STATUS):
        if code in table:
            return f"0x{code:04X} ({table[code][1] or table[code][0]})"
    if (code & 0xFF00) == 0xA700:
        return f"0x{code:04X} (Refused: Out of Resources)"
    if (code & 0xFF00) == 0xA900:
        return f"0x{code:04X} (Error: Data Set Does Not Match SOP Class)"
    if (code & 0xF000) == 0xC000:
        return f"0x{code:04X} (Error: Cannot Understand)"
    return f"0x{code:04X}"


def failure_is_transient(code: int) -> bool:
    """As for C-STORE: only "out of resources" (0xA7xx) may succeed when tried again."""
    return (code & 0xFF00) == 0xA700


def failed_instances(response: pydicom.Dataset, sent: Sequence[pydicom.Dataset]) -> list[tuple[str, int]]:
    """(which object, failure reason) for each FailedSOPSequence item of a STOW response.

    Objects are named by position and SOP class ("object 1 (Comprehensive 3D SR Storage)"), or
    by a hash of an unknown SOP Instance UID, never by a raw UID (logs carry no identifiers).
    """
    by_uid = {str(ds.SOPInstanceUID): (index, ds) for index, ds in enumerate(sent, start=1)}
    failures = []
    for item in response.get(_FAILED_SOP_SEQUENCE, []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        reason = item.get("FailureReason")
        code = int(reason) if reason is not None else 0x0110  # absent: a processing failure
        if uid in by_uid:
            index, ds = by_uid[uid]
            name = f"object {index} ({UID(str(ds.SOPClassUID)).name})"
        else:
            name = f"instance #{hashed(uid)}" if uid else "an unnamed instance"
        failures.append((name, code))
    return failures


def _response_dataset(response: requests.Response) -> pydicom.Dataset | None:
    """The Store Instances Response Module in a (failed) STOW answer, where there is one."""
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    # Orthanc answers 4xx STOW bodies without a Content-Type: try JSON whenever it looks like it.
    if content_type in ("application/dicom+json", "application/json") or (
        not content_type and response.content.lstrip().startswith(b"{")
    ):
        try:
            return pydicom.Dataset.from_json(response.json())
        except (ValueError, TypeError, KeyError):
            return None
    return None


def _body_excerpt(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("Message"), str):  # Orthanc's error object
        return " ".join(data["Message"].split())[:_MAX_BODY_IN_DETAIL]
    text = response.text.strip()
    content_type = response.headers.get("Content-Type", "").lower()
    if "html" in content_type or text[:1] == "<":
        return html_summary(text)
    text = " ".join(text.split())
    return text[:_MAX_BODY_IN_DETAIL] if text and not text.startswith("{") else ""


def html_summary(page: str) -> str:
    """One line for an HTML error page (a proxy's or a servlet container's): its title, else its
    first heading, else its text, without markup, scripts or styles."""
    for pattern in (r"<title[^>]*>(.*?)</title>", r"<h[1-3][^>]*>(.*?)</h[1-3]>"):
        match = re.search(pattern, page, flags=re.I | re.S)
        if match and (found := _plain(match[1])):
            return found[:_MAX_BODY_IN_DETAIL]
    body = re.sub(r"<(script|style)\b.*?</\1\s*>", " ", page, flags=re.I | re.S)
    return _plain(body)[:_MAX_BODY_IN_DETAIL]


def _plain(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", markup)).split())


def outcome_of_failures(failures: list[tuple[str, int]], http_status: int, detail_prefix: str) -> SendOutcome:

    reasons = "; ".join(f"{name}: {failure_reason_text(code)}" for name, code in failures)
    transient = not http_status_is_permanent(http_status) or any(failure_is_transient(c) for _, c in failures)
    return SendOutcome(False, permanent=not transient, detail=f"{detail_prefix}: failed {reasons}")


def store(client: DICOMwebClient, datasets: Sequence[pydicom.Dataset], study_uid: str | None) -> SendOutcome:
    """POST ``datasets`` in one STOW-RS request and classify the answer."""

    try:
        answer = client.store_instances(datasets, study_instance_uid=study_uid)
    except requests.HTTPError as exc:
        response = exc.response
        if response is None:
            return SendOutcome(False, permanent=False, detail=f"STOW-RS failed: {exc}")
        status = response.status_code
        prefix = f"STOW-RS HTTP {status} {response.reason or ''}".rstrip()
        parsed = _response_dataset(response)
        failures = failed_instances(parsed, datasets) if parsed is not None else []
        if failures:
            return outcome_of_failures(failures, status, prefix)
        excerpt = _body_excerpt(response)
        return SendOutcome(False, permanent=http_status_is_permanent(status),
                           detail=prefix + (f": {excerpt}" if excerpt else ""))
    except requests.Timeout as exc:
        return SendOutcome(False, permanent=False, detail=f"STOW-RS timeout ({type(exc).__name__})")
    except requests.ConnectionError as exc:
        # Refused, reset, DNS, TLS handshake and certificate errors: the peer or the path to it,
        # which an operator (or time) fixes without touching the queued result.
        kind = "TLS error" if isinstance(exc, requests.exceptions.SSLError) else "connection error"
        return SendOutcome(False, permanent=False, detail=f"STOW-RS {kind}: {_short(exc)}")
    except RedirectRefused as exc:  # the URL needs correcting: an administrator's job
        return SendOutcome(False, permanent=True, detail=str(exc))
    except AnswerCut as exc:  # the objects may or may not be stored: sent again later (idempotent)
        return SendOutcome(False, permanent=False, detail=f"STOW-RS {exc}")
    except requests.RequestException as exc:  # invalid URL...
        return SendOutcome(False, permanent=True, detail=f"STOW-RS request failed: {_short(exc)}")
    failures = failed_instances(answer, datasets)
    if failures:
        return outcome_of_failures(failures, 202, "STOW-RS HTTP 202 Accepted")
    stored = len(answer.get("ReferencedSOPSequence", []))
    return SendOutcome(True, permanent=False, detail=f"STOW-RS stored {stored} of {len(datasets)} objects")


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, on one short line."""
    reason = exc
    while reason.__context__ is not None and reason.__context__ is not reason:
        reason = reason.__context__
    text = str(reason) or type(reason).__name__
    return text.replace("\n", " ")[:_MAX_BODY_IN_DETAIL]


def send_files(paths: Sequence[str | Path], destination: Destination, timeout: float = 30) -> SendOutcome:
    """STOW-RS the files (in this order, one request) to a DICOMweb destination."""

    if destination.url is None:
        raise ValueError(f"{destination} is not a DICOMweb destination")
    datasets = [pydicom.dcmread(str(path)) for path in paths]
    if not datasets:
        return SendOutcome(True, permanent=False, detail="nothing to send")
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    # One delivery is one study's results; should that ever not hold, POST to .../studies.
    study_uid = studies.pop() if len(studies) == 1 else None
    try:
        client = make_client(destination, timeout)
    except SecretUnavailable as exc:
        return SendOutcome(False, permanent=True, detail=str(exc))
    return store(client, datasets, study_uid)


def check_stow(destination: Destination, timeout: float = 10) -> tuple[bool, str]:
    """Self-check of a DICOMweb destination: a one-study QIDO-RS search on the same service and
    credentials answers (STOW itself would store something). (ok, detail)."""
    try:
        client = make_client(destination, timeout)
        client.search_for_studies(limit=1, fields=["StudyInstanceUID"])
    except SecretUnavailable as exc:
        return False, str(exc)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        return False, f"HTTP {status} on QIDO-RS search" + (" (check credentials)" if status in (401, 403) else "")
    except (RedirectRefused, AnswerCut) as exc:
        # The same refusal as for a delivery, named for the request that met it.
        return False, f"QIDO-RS search: {str(exc).removeprefix('STOW-RS ')}"
    except requests.RequestException as exc:
        return False, f"unreachable: {_short(exc)}"
    return True, "DICOMweb service answers (QIDO-RS)"
