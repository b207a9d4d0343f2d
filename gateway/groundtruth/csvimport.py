"""``osteogate dxa import FILE.csv``: DXA results exported from the RIS or the DXA software.

Columns ``patient_id,issuer_of_patient_id,dxa_date,site,t_score`` (one row per measured site;
issuer may be empty; dates YYYYMMDD). A spreadsheet's own export is read as well: byte-order mark,
CRLF, header names in any case, and a semicolon- or tab-separated file (what Excel writes where the
decimal separator is a comma), whose T-scores may then use a decimal comma. Every row is checked before anything is stored; any bad
row (each named with its line number) and nothing is imported. The import is one transaction and
idempotent: an exam already present with the same sites is counted, not added again.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from osteogate.gateway.core.errors import ExitCode, NotFoundError, OsteoGateError
from osteogate.gateway.groundtruth.exams import (
    DxaResult,
    DxaSiteValue,
    SaveOutcome,
    check_t_score,
    save_results,
)
from osteogate.gateway.store.db import Database

COLUMNS = ("patient_id", "issuer_of_patient_id", "dxa_date", "site", "t_score")


class DxaImportError(OsteoGateError):
    """The file has bad rows (listed in ``problems``); nothing was imported."""

    exit_code = ExitCode.DATAERR

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"nothing imported from {path.name}",
                         f"{len(problems)} problem(s), first: {problems[0]}",
                         "Fix every listed line and import the file again")


@dataclass(frozen=True)
class ImportSummary:
    rows: int
    exams: int
    new: int
    unchanged: int
    updated: int


def _date(text: str, today: date) -> tuple[date | None, str | None]:
    if len(text) != 8 or not text.isdigit():
        return None, f"dxa_date {text[:20]!r} is not YYYYMMDD"
    try:
        value = datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None, f"dxa_date {text!r} is not a calendar date"
    if value > today:
        return None, f"dxa_date {text} is in the future"
    return value, None


def _delimiter(header: str) -> str:
    """The separator that splits ``header`` into all of COLUMNS (comma when none does)."""
    for delimiter in (",", ";", "\t"):
        if set(COLUMNS) <= {name.strip().strip('"').lower() for name in header.split(delimiter)}:
            return delimiter
    return ","


def _row(line: int, row: dict[str, str | None], name: str, today: date,
         decimal_comma: bool = False) -> tuple[DxaResult | None, list[str]]:
    values = {k: (row.get(k) or "").strip() for k in COLUMNS}
    problems = []
    if not values["patient_id"]:
        problems.append("patient_id is empty")
    for key in ("patient_id", "issuer_of_patient_id", "site"):
        if len(values[key]) > 64:
            problems.append(f"{key} is longer than 64 characters")
    if not values["site"]:
        problems.append("site is empty")
    day, problem = _date(values["dxa_date"], today)
    if problem:
        problems.append(problem)
    t_score = None
    try:
        t_score = float(values["t_score"].replace(",", ".", 1) if decimal_comma else values["t_score"])
    except ValueError:
        problems.append(f"t_score {values['t_score'][:20]!r} is not a number")
    else:
        problem = check_t_score(t_score)
        if problem:
            problems.append(f"t_score {problem}")
    if problems or day is None or t_score is None:
        return None, [f"line {line}: {'; '.join(problems)}"]
    return DxaResult(values["patient_id"], values["issuer_of_patient_id"] or None, day, "csv",
                     f"{name}:{line}", (DxaSiteValue(values["site"], t_score),)), []


def read_csv(path: Path, *, today: date | None = None) -> tuple[list[DxaResult], int]:
    """Check every row of ``path``; nothing is stored here.

    Parameters
    ----------
    path
        A UTF-8 CSV (a byte-order mark is fine) whose header names ``COLUMNS``; more columns are
        ignored.
    today
        Dates after it are refused (default: today).

    Returns
    -------
    tuple of (list of DxaResult, int)
        One result per distinct row (an identical repeated row counts once) and their number.

    Raises
    ------
    DxaImportError
        Any bad row, missing column, non-UTF-8 text or no data row; ``problems`` names each,
        with its line number.
    NotFoundError
        ``path`` is not a file.
    """
    if not path.is_file():
        raise NotFoundError(f"no file {path}", None, "Give the path of the CSV export")
    today = today or date.today()
    problems: list[str] = []
    results: list[DxaResult] = []
    seen: dict[tuple[str, str, date, str], tuple[int, float]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
            delimiter = _delimiter(handle.readline())
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter=delimiter)
            reader.fieldnames = [(n or "").strip().lower() for n in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DxaImportError(path, [f"line 1: the header lacks column(s) {', '.join(missing)} "
                                            f"(expected {','.join(COLUMNS)})"])
            for row in reader:
                line = reader.line_num
                if None in row:
                    problems.append(f"line {line}: more fields than the header has columns")
                    continue
                if not any((v or "").strip() for v in row.values()):
                    continue  # a blank line (spreadsheets add them at the end)
                result, row_problems = _row(line, row, path.name, today, decimal_comma=delimiter != ",")
                problems.extend(row_problems)
                if result is None:
                    continue
                site = result.sites[0]
                key = (result.patient_id, result.issuer_of_patient_id or "", result.dxa_date, site.site)
                earlier = seen.get(key)
                if earlier and earlier[1] != site.t_score:
                    problems.append(f"line {line}: site {site.site!r} of this exam already has T-score "
                                    f"{earlier[1]:g} on line {earlier[0]}")
                    continue
                if earlier is None:
                    seen[key] = (line, site.t_score)
                    results.append(result)
    except UnicodeDecodeError as exc:
        problems.append(f"the file is not UTF-8 text (byte {exc.start}): export it as UTF-8 CSV")
    except csv.Error as exc:
        problems.append(f"line {reader.line_num}: not valid CSV ({exc})")
    if problems:
        raise DxaImportError(path, problems)
    if not results:
        raise DxaImportError(path, ["no data rows after the header"])
    return results, len(results)


def import_csv(db: Database, path: Path, *, today: date | None = None) -> ImportSummary:
    """Check every row of ``path``, then store them all in one transaction.

    Parameters
    ----------
    db
        The gateway's database (schema at head).
    path
        The CSV export (see ``read_csv``).
    today
        Dates after it are refused (default: today).

    Returns
    -------
    ImportSummary
        Rows read, exams, and how many were new, already present or updated.

    Raises
    ------
    DxaImportError
        As ``read_csv``; nothing is stored.
    """
    results, rows = read_csv(path, today=today)
    with db.session(write=True) as session:
        outcomes = Counter(save_results(session, results))
    return ImportSummary(rows=rows, exams=sum(outcomes.values()), new=outcomes[SaveOutcome.NEW],
                         unchanged=outcomes[SaveOutcome.UNCHANGED], updated=outcomes[SaveOutcome.UPDATED])
