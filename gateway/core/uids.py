"""DICOM UID validation, done before a UID becomes part of a file path."""

from __future__ import annotations

import re

# PS3.5 9.1: components of digits separated by dots, no leading zero in a multi-digit component,
# at most 64 characters. Anything else (``../``, slashes, spaces) never reaches the filesystem.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class InvalidUIDError(ValueError):
    pass


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


def require_uid(value: object, name: str) -> str:
    """Return the UID if valid, else raise InvalidUIDError naming the attribute (not the value)."""
    text = str(value).strip("\x00 ") if value is not None else ""
    if not is_valid_uid(text):
        raise InvalidUIDError(f"{name} is missing or not a valid DICOM UID")
    return text
