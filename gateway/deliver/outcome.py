"""What one delivery attempt came to, for C-STORE and STOW-RS alike: ok, or failed transiently
(retried with backoff) or permanently (marked rejected, reason in words)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    permanent: bool
    detail: str
