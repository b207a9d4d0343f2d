"""Where results go: a DICOM peer (AET@HOST:PORT, optionally +tls) or a DICOMweb STOW-RS URL
with its credentials; parsed and validated once, printed without secrets."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control chars
_DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})(?P<tls>\+tls)?$")


def check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value) or not value:
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return value


_DIMSE_FIELDS = ("ae_title", "host", "port", "tls")
_WEB_FIELDS = ("url", "username", "password", "password_file", "password_env", "token", "token_file",
               "token_env", "tls_verify", "ca_file")
# deliveries.destination (gateway/store/db.py) holds str(destination) in 128 characters.
_MAX_DESTINATION_TEXT = 128
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Destination(BaseModel):
    """Where the result objects (SR, result card) go: a PACS by DICOM C-STORE, given as
    ``AET@HOST:PORT`` (``ae_title``/``host``/``port``/``tls``), or a DICOMweb STOW-RS endpoint
    (``url``, PS3.18 10.5) with optional HTTP basic or bearer authentication.

    Secrets may be written inline, but ``password_file``/``token_file`` (a file holding only the
    secret) or ``password_env``/``token_env`` (the name of an environment variable) keep them out
    of the TOML file; they are read at each send (gateway/deliver/stow.py), so a rotated secret is picked
    up without a restart. ``str()`` never contains a secret: it is what the deliveries table and
    the logs record, and it is how a delivery finds its destination's settings again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # DICOM C-STORE
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: bool = False
    # DICOMweb STOW-RS
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    token_env: str | None = None
    tls_verify: bool = True
    ca_file: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {value!r} is not an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            # The URL is logged and stored in SQL: credentials belong in username/password(_file).
            raise ValueError("url must not contain credentials; use username + password_file or token_file")
        if parts.query or parts.fragment:
            raise ValueError("url must not have a query or fragment")
        try:
            parts.port  # noqa: B018 -- raises ValueError for a port out of range
        except ValueError:
            raise ValueError(f"url {value!r} has an invalid port") from None
        if len(value) > _MAX_DESTINATION_TEXT:
            raise ValueError(f"url is longer than {_MAX_DESTINATION_TEXT} characters")
        return value

    @field_validator("password_env", "token_env")
    @classmethod
    def _valid_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        given = self.model_fields_set
        if self.url is not None:
            stray = [f for f in _DIMSE_FIELDS if f in given and getattr(self, f) not in (None, False)]
            if stray:
                raise ValueError(f"a DICOMweb destination (url) takes no {', '.join(stray)}")
            self._check_web_auth()
            return self
        if self.ae_title is None or self.host is None or self.port is None:
            raise ValueError("a destination needs either url (DICOMweb) or ae_title, host and port (C-STORE)")
        stray = [f for f in _WEB_FIELDS if f in given and getattr(self, f) not in (None, True)]
        if stray:
            raise ValueError(f"a C-STORE destination takes no {', '.join(stray)} (those are for url)")
        if len(str(self)) > _MAX_DESTINATION_TEXT:
            raise ValueError(f"destination is longer than {_MAX_DESTINATION_TEXT} characters")
        return self

    def _check_web_auth(self) -> None:
        passwords = [n for n in ("password", "password_file", "password_env") if getattr(self, n) is not None]
        tokens = [n for n in ("token", "token_file", "token_env") if getattr(self, n) is not None]
        if len(passwords) > 1 or len(tokens) > 1:
            raise ValueError(f"give one of {' / '.join(passwords if len(passwords) > 1 else tokens)}")
        if passwords and tokens:
            raise ValueError("basic (username + password) and bearer (token) authentication exclude each other")
        if (self.username is None) != (not passwords):
            raise ValueError("username and a password (password, password_file or password_env) go together")
        for name in ("password_file", "token_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        for name in ("password_env", "token_env"):
            variable = getattr(self, name)
            if variable is not None and variable not in os.environ:
                raise ValueError(f"{name}: environment variable {variable} is not set")

    @property
    def kind(self) -> Literal["dimse", "dicomweb"]:
        """How results reach this destination: DICOM C-STORE or DICOMweb STOW-RS."""
        return "dicomweb" if self.url is not None else "dimse"

    @property
    def name(self) -> str:
        """Short name for logs: the called AE title, or the URL's host and path."""
        if self.url is not None:
            parts = urlsplit(self.url)
            return f"{parts.netloc}{parts.path}"
        return str(self.ae_title)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` (``+tls`` appended for TLS), or an http(s) STOW-RS URL, as
        written on the command line or in OSTEOGATE_DELIVERY_DESTINATIONS."""
        text = text.strip()
        if re.match(r"^https?://", text, re.IGNORECASE):
            return cls(url=text)
        match = _DEST_RE.match(text)
        if not match:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT or an http(s):// STOW-RS URL")
        return cls(ae_title=match["aet"], host=match["host"], port=int(match["port"]), tls=bool(match["tls"]))

    def __str__(self) -> str:
        if self.url is not None:
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")
