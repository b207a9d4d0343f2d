"""`osteogate dxa import|list|stats` as an operator runs them: a real SQLite store, real CSV files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from osteogate.gateway.groundtruth.csvimport import DxaImportError, read_csv

REPO = Path(__file__).resolve().parent.parent
HEADER = "patient_id,issuer_of_patient_id,dxa_date,site,t_score\n"


def osteogate(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    return subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", *args, "--data-dir", str(data_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "var"
    assert osteogate("db", "upgrade", data_dir=directory).returncode == 0
    return directory


def write(tmp_path: Path, body: str, name: str = "dxa.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + body, encoding="utf-8")
    return path


GOOD = ("PAT001,HOSP_A,20250601,L1-L4,-2.6\n"
        "PAT001,HOSP_A,20250601,Femoral neck,-1.4\n"
        "PAT002,,20250315,Total hip,-0.4\n")


def test_import_is_idempotent_and_counts_new_and_present(data_dir: Path, tmp_path: Path) -> None:
    csv_file = write(tmp_path, GOOD)
    first = osteogate("dxa", "import", str(csv_file), data_dir=data_dir)
    assert first.returncode == 0, first.stderr
    assert "3 row(s), 2 exam(s): 2 new, 0 already present, 0 updated" in first.stdout
    again = osteogate("dxa", "import", str(csv_file), data_dir=data_dir)
    assert "2 exam(s): 0 new, 2 already present, 0 updated" in again.stdout
    corrected = write(tmp_path, GOOD.replace("-1.4", "-1.5"), "corrected.csv")
    assert "1 already present, 1 updated" in osteogate("dxa", "import", str(corrected), data_dir=data_dir).stdout

    listed = json.loads(osteogate("dxa", "list", "--json", data_dir=data_dir).stdout)
    assert [(r["dxa_date"], r["lowest_t_score"], r["who_category"]) for r in listed] == [
        ("2025-06-01", -2.6, "osteoporosis"), ("2025-03-15", -0.4, "normal")]
    assert listed[0]["sites"] == {"L1-L4": -2.6, "Femoral neck": -1.5}
    stats = osteogate("dxa", "stats", "--json", data_dir=data_dir)
    numbers = json.loads(stats.stdout)
    assert (numbers["exams"], numbers["patients"], numbers["sites"], numbers["pairs"]) == (2, 2, 3, 0)
    for output in (stats.stdout, osteogate("dxa", "list", data_dir=data_dir).stdout, first.stdout, first.stderr):
        assert "PAT001" not in output and "PAT002" not in output  # hashed ids only


def test_every_bad_row_is_named_and_nothing_is_imported(data_dir: Path, tmp_path: Path) -> None:
    csv_file = write(tmp_path, GOOD + ",HOSP_A,20250601,L1-L4,-2.0\n"  # line 5
                     "PAT003,,2025-06-01,L1-L4,-2.0\n"  # line 6
                     "PAT003,,20250631,L1-L4,-2.0\n"  # line 7
                     "PAT003,,20250601,L1-L4,abc\n"  # line 8
                     "PAT003,,20250601,,-40\n"  # line 9
                     "PAT001,HOSP_A,20250601,L1-L4,-2.5\n"  # line 10: contradicts line 2
                     "\n"
                     "PAT004,,20250601,L1-L4,-1.0,extra\n")  # line 12
    result = osteogate("dxa", "import", str(csv_file), data_dir=data_dir)
    assert result.returncode == 65, result.stderr  # EX_DATAERR
    lines = [line.split(" (")[0] for line in result.stderr.splitlines()]
    for expected in ("dxa.csv: line 5: patient_id is empty",
                     "dxa.csv: line 6: dxa_date '2025-06-01' is not YYYYMMDD",
                     "dxa.csv: line 7: dxa_date '20250631' is not a calendar date",
                     "dxa.csv: line 8: t_score 'abc' is not a number",
                     "dxa.csv: line 9: site is empty; t_score -40 is outside -10..10",
                     "dxa.csv: line 10: site 'L1-L4' of this exam already has T-score -2.6 on line 2",
                     "dxa.csv: line 12: more fields than the header has columns"):
        assert expected in lines, result.stderr
    assert result.stderr.splitlines()[-1].startswith("osteogate: nothing imported from dxa.csv: 7 problem(s), first: line 5")
    assert "Traceback" not in result.stderr
    assert json.loads(osteogate("dxa", "stats", "--json", data_dir=data_dir).stdout)["exams"] == 0


@pytest.mark.parametrize(("text", "encoding"), [
    ("\ufeffPatient_ID,Issuer_of_Patient_ID,DXA_Date,Site,T_Score\r\nP1,,20250101,Total hip,-1.5\r\n"
     "P2,HOSP,20250102,L1-L4,-2.7\r\n", "utf-8"),
    ("patient_id;issuer_of_patient_id;dxa_date;site;t_score\nP1;;20250101;Total hip;-1,5\nP2;HOSP;20250102;L1-L4;-2,7\n",
     "utf-8-sig"),
    ("patient_id\tissuer_of_patient_id\tdxa_date\tsite\tt_score\nP1\t\t20250101\tTotal hip\t-1.5\n"
     "P2\tHOSP\t20250102\tL1-L4\t-2.7\n", "utf-8"),
], ids=["excel-bom-crlf-case", "semicolon-decimal-comma", "tab"])
def test_spreadsheet_exports_are_read(tmp_path: Path, text: str, encoding: str) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(text.encode(encoding))
    results, rows = read_csv(path)
    assert rows == 2
    assert [(r.patient_id, r.issuer_of_patient_id, r.sites[0].t_score) for r in results] == [
        ("P1", None, -1.5), ("P2", "HOSP", -2.7)]


def test_decimal_comma_is_not_guessed_in_a_comma_separated_file(tmp_path: Path) -> None:
    with pytest.raises(DxaImportError) as raised:
        read_csv(write(tmp_path, 'P1,,20250101,Total hip,"-1,5"\n'))
    assert "t_score '-1,5' is not a number" in raised.value.problems[0]


def test_header_and_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "m.csv"
    missing.write_text("patient_id,dxa_date,t_score\nP,20250101,-1\n")
    with pytest.raises(DxaImportError, match="lacks column.s. issuer_of_patient_id, site"):
        read_csv(missing)
    with pytest.raises(DxaImportError, match="no data rows"):
        read_csv(write(tmp_path, ""))
    latin = tmp_path / "l.csv"
    latin.write_bytes((HEADER + "M\xfcller,,20250101,hip,-1\n").encode("latin-1"))
    with pytest.raises(DxaImportError, match="not UTF-8"):
        read_csv(latin)
    bom = tmp_path / "bom.csv"
    bom.write_text(HEADER + GOOD, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert read_csv(bom)[1] == 3


def test_missing_store_is_one_line(tmp_path: Path) -> None:
    result = osteogate("dxa", "list", data_dir=tmp_path / "nowhere")
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "no OsteoGate database" in result.stderr
