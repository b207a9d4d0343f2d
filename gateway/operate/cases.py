"""``osteogate cases``: the case-finding list (placeholder, filled in below)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(cmds: Any) -> argparse.ArgumentParser:
    parser = cmds.add_parser("cases", help="case-finding list: one row a patient, lowest estimated T-score first")
    parser.set_defaults(func=lambda args: 0)
    return parser
