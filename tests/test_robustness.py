"""Fuzzed input against a running gateway: every odd or broken instance gets an answer, none a crash.

A corpus of damaged, hostile and merely unusual instances is built here, sent over real DICOM
associations (pynetdicom, raw file bytes, no re-encoding) to `osteogate serve`, and then the
gateway must still echo, still store and classify a good study, have written nothing outside its
spool, and have sent only well-formed SRs (each parses and passes dciodvfy without "Error").
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_dataset as pydicom_write_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, dcmtk_available, echoscu, make_dataset, wait_until, write_dataset

pytestmark = pytest.mark.skipif(not dcmtk_available("storescu", "storescp", "echoscu"), reason="dcmtk missing")

# Send files' bytes as they are on disk: pynetdicom otherwise decodes and re-encodes them, which
# would repair (or choke on) exactly the damage this corpus is made of.
_config.STORE_SEND_CHUNKED_DATASET = True

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
FAILURE_STATUSES = {0xA900, 0xC000, 0x0122, 0x0124}
NOT_SENT = -1  # the SCU could not even offer it: no accepted presentation context

DX = str(DigitalXRayImageStorageForPresentation)
CR = str(ComputedRadiographyImageStorage)


@dataclass
class Case:
    name: str
    path: Path
    expect: str  # "refused": a failure status (or refused at negotiation); "accepted": success
    contexts: tuple[tuple[str, str], ...] = ()  # (abstract syntax, transfer syntax) to propose
    study_uid: str | None = None


def _raw_file(meta: FileMetaDataset, body: bytes, path: Path) -> Path:
    """Part 10 file from a file meta and already encoded dataset bytes (no consistency checks)."""
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    out.write(body)
    path.write_bytes(out.getvalue())
    return path


def _explicit_le_body(ds: Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom_write_dataset(buffer, ds)
    return buffer.getvalue()


def build_corpus(work: Path) -> list[Case]:
    work.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    good_bytes = write_dataset(make_dataset(), work / "template.dcm").read_bytes()
    (work / "truncated_pixels.dcm").write_bytes(good_bytes[: len(good_bytes) - 3000])
    cases.append(Case("truncated in pixel data", work / "truncated_pixels.dcm", "refused"))
    # Cut inside the header: the element being read ends mid-value.
    (work / "truncated_header.dcm").write_bytes(good_bytes[:600])
    cases.append(Case("truncated in header", work / "truncated_header.dcm", "refused"))

    wrong_vr_uid = make_dataset()
    wrong_vr_uid.add_new(0x0020000D, "US", 7)  # StudyInstanceUID must be UI
    cases.append(Case("StudyInstanceUID with VR US", _raw_file(
        wrong_vr_uid.file_meta, _explicit_le_body(wrong_vr_uid), work / "wrong_vr_uid.dcm"), "refused"))

    huge = make_dataset()
    huge.Rows = huge.Columns = 60000  # declared 60000x60000, 8 KB of pixels really present
    cases.append(Case("60000x60000 declared", _raw_file(huge.file_meta, _explicit_le_body(huge),
                                                         work / "huge.dcm"), "refused"))
    empty_pixels = make_dataset()
    empty_pixels.PixelData = b""
    cases.append(Case("zero-length Pixel Data", _raw_file(empty_pixels.file_meta, _explicit_le_body(empty_pixels),
                                                           work / "empty_pixels.dcm"), "refused"))
    zero_rows = make_dataset()
    zero_rows.Rows = 0
    cases.append(Case("Rows 0", _raw_file(zero_rows.file_meta, _explicit_le_body(zero_rows),
                                          work / "zero_rows.dcm"), "refused"))

    # An unknown transfer syntax cannot be negotiated: the gateway must refuse the context.
    unknown_ts = make_dataset()
    unknown_ts.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8.9"
    cases.append(Case("unknown transfer syntax", _raw_file(unknown_ts.file_meta, _explicit_le_body(unknown_ts),
                                                            work / "unknown_ts.dcm"), "refused",
                      contexts=((DX, "1.2.3.4.5.6.7.8.9"),)))
    # Labelled JPEG 2000 but native bytes inside: acceptable on the wire (it is not decoded on
    # receipt), so it is stored, and the worker must record a skip instead of crashing.
    mislabelled = make_dataset(study_uid=generate_uid())
    mislabelled.file_meta.TransferSyntaxUID = JPEG2000Lossless
    cases.append(Case("native pixels labelled JPEG 2000", _raw_file(
        mislabelled.file_meta, _explicit_le_body(mislabelled), work / "mislabelled.dcm"), "refused_or_skipped",
        contexts=((DX, str(JPEG2000Lossless)),), study_uid=mislabelled.StudyInstanceUID))

    for element in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        evil = make_dataset()
        setattr(evil, element, "1.2.3/../../../../tmp/evil" if element != "StudyInstanceUID" else "../../evil")
        evil.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"  # pynetdicom needs a valid one to send
        cases.append(Case(f"{element} with ../", _raw_file(evil.file_meta, _explicit_le_body(evil),
                                                          work / f"evil_{element}.dcm"), "refused"))
    no_uid = make_dataset()
    del no_uid.StudyInstanceUID
    cases.append(Case("no StudyInstanceUID", _raw_file(no_uid.file_meta, _explicit_le_body(no_uid),
                                                       work / "no_study_uid.dcm"), "refused"))

    # The context says CR, the dataset says DX.
    mismatch = make_dataset()
    mismatch.file_meta.MediaStorageSOPClassUID = CR
    cases.append(Case("SOP class differs from context", _raw_file(
        mismatch.file_meta, _explicit_le_body(mismatch), work / "mismatch.dcm"), "refused",
        contexts=((CR, str(ExplicitVRLittleEndian)),)))
    # A standard storage SOP class the gateway does not process (CT): acknowledged, not stored, so
    # a PACS routing a whole study never fails on it.
    ct = make_dataset(modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    cases.append(Case("CT image (stored by PACS, out of scope here)", write_dataset(ct, work / "ct.dcm"),
                      "acknowledged", contexts=(("1.2.840.10008.5.1.4.1.1.2", str(ExplicitVRLittleEndian)),)))
    # A private SOP class no standard names: refused at negotiation.
    private = make_dataset(SOPClassUID="1.2.826.0.1.3680043.9999.1")
    cases.append(Case("private SOP class", write_dataset(private, work / "private.dcm"), "refused",
                      contexts=(("1.2.826.0.1.3680043.9999.1", str(ExplicitVRLittleEndian)),)))

    # Acceptable but unusual: must be stored and classified (or skipped with a reason).
    utf8 = make_dataset(study_uid=generate_uid(), SpecificCharacterSet="ISO_IR 192",
                        PatientName="Müller^Jürgen=山田^太郎", InstitutionName="Klinikum Köln")
    cases.append(Case("UTF-8 patient name", write_dataset(utf8, work / "utf8.dcm"), "accepted",
                      study_uid=utf8.StudyInstanceUID))
    latin1 = make_dataset(study_uid=generate_uid(), SpecificCharacterSet="ISO_IR 100", PatientName="Gonçalves^Zoë")
    cases.append(Case("Latin-1 patient name", write_dataset(latin1, work / "latin1.dcm"), "accepted",
                      study_uid=latin1.StudyInstanceUID))
    frames = make_dataset(study_uid=generate_uid())
    frames.NumberOfFrames = 3
    frames.PixelData = frames.PixelData * 3
    cases.append(Case("3 frames", write_dataset(frames, work / "frames.dcm"), "accepted_or_skipped",
                      study_uid=frames.StudyInstanceUID))
    return cases


@contextmanager
def association(port: int, contexts: tuple[tuple[str, str], ...]) -> Iterator[object]:
    ae = AE(ae_title="FUZZER")
    # Bounded waits: a hang in the gateway must fail this test, not stall the suite.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, transfer in contexts:
        ae.add_requested_context(abstract, [transfer])
    # Verification always negotiates, so a refused storage context shows as a missing context on
    # an established association (pynetdicom aborts associations with no accepted context at all).
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def send_raw(port: int, case: Case) -> int:
    """Status of the C-STORE of the file's bytes; NOT_SENT when no context was accepted."""
    contexts = case.contexts or ((DX, str(ExplicitVRLittleEndian)),)
    with association(port, contexts) as assoc:
        assert assoc.is_established, f"{case.name}: association failed"
        try:
            status = assoc.send_c_store(case.path)
        except ValueError:  # "no accepted presentation context" for this file
            return NOT_SENT
        assert status and "Status" in status, f"{case.name}: no C-STORE response (hang or abort)"
        return int(status.Status)


def dciodvfy_errors(path: Path) -> list[str]:
    if not shutil.which("dciodvfy"):
        return []
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the corpus is invalid on purpose
def test_fuzzed_corpus_never_crashes_hangs_or_escapes(tmp_path: Path, dcmtk_pacs: StoreSCP,
                                                      tiny_model: Path) -> None:
    cases = build_corpus(tmp_path / "corpus")
    data_dir = tmp_path / "gw"
    with GatewayProcess(data_dir, model=tiny_model, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"]) as gw:
        statuses = {case.name: send_raw(gw.port, case) for case in cases}
        problems = []
        for case in cases:
            code = statuses[case.name]
            if case.expect == "refused" and code not in FAILURE_STATUSES | {NOT_SENT}:
                problems.append(f"{case.name}: expected a refusal, got 0x{code:04X}")
            if (case.expect.startswith("accepted") or case.expect == "acknowledged") and code != SUCCESS:
                problems.append(f"{case.name}: expected success, got {code:#06x}")
            if case.expect == "refused_or_skipped" and code not in FAILURE_STATUSES | {SUCCESS}:
                problems.append(f"{case.name}: expected refusal or success, got {code:#06x}")
        assert not problems, "\n".join(problems)

        # Still serving after the corpus: echo, then a good study all the way to the PACS.
        assert echoscu("127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        good = make_dataset(study_uid=generate_uid())
        good_case = Case("good", write_dataset(good, tmp_path / "corpus" / "good.dcm"), "accepted")
        assert send_raw(gw.port, good_case) == SUCCESS

        accepted_studies = {c.study_uid for c in cases if c.study_uid and statuses[c.name] == SUCCESS}
        accepted_studies.add(good.StudyInstanceUID)

        def all_finished() -> list[dict]:
            rows = [r for r in gw.studies() if r["study_uid"] in accepted_studies]
            return rows if len(rows) == len(accepted_studies) and all(
                r["status"] in ("done", "skipped", "failed") for r in rows) else []

        rows = {r["study_uid"]: r for r in wait_until(all_finished, 50, interval=0.5)}
        # A study the worker could not read is a recorded skip, never a failed job.
        assert {r["status"] for r in rows.values()} <= {"done", "skipped"}, rows
        assert rows[good.StudyInstanceUID]["status"] == "done"
        for case in cases:
            if case.expect == "accepted":
                assert rows[case.study_uid]["status"] == "done", (case.name, rows[case.study_uid])
            if case.study_uid in rows and rows[case.study_uid]["status"] == "skipped":
                show = gw.cli("show", case.study_uid).stdout
                assert "skipped" in show, show
        n_done = sum(r["status"] == "done" for r in rows.values())
        srs = dcmtk_pacs.wait_for_files("SR*.dcm", count=n_done, timeout=30)
        assert gw.proc is not None and gw.proc.poll() is None, "gateway died"
        crash_events = [e for e in gw.events() if e.get("event") in ("instance_store_failed", "worker_loop_error")]

    # Every SR that reached the PACS is complete and valid.
    assert len(srs) == n_done
    for sr in srs:
        ds = pydicom.dcmread(sr)
        assert ds.StudyInstanceUID in accepted_studies
        assert dciodvfy_errors(sr) == [], sr.name

    # Nothing was written outside the gateway's own layout, and no temporary file was left behind.
    # Top level: spool, reports, models and the SQLite file with its companions (-wal, -shm, locks).
    unexpected = [p.name for p in data_dir.iterdir()
                  if p.name not in {"spool", "reports", "models"} and not p.name.startswith("osteogate.db")]
    assert unexpected == []
    assert not [p for p in data_dir.rglob(".incoming-*")]
    assert not [p for p in tmp_path.rglob("*evil*") if "corpus" not in p.parts]
    assert not Path("/tmp/evil").exists()
    spooled = list((data_dir / "spool").rglob("*.dcm"))
    for path in spooled:
        assert path.relative_to(data_dir / "spool").parts[0] in accepted_studies
    # Unexpected exceptions are bugs even when the status was right (0xA700 from a catch-all).
    assert crash_events == [], crash_events


def test_rows_with_wrong_vr_is_refused_as_malformed(tmp_path: Path, tiny_model: Path) -> None:
    wrong_vr = make_dataset()
    wrong_vr.add_new(0x00280010, "LO", "not-a-number")  # Rows must be US
    case = Case("Rows with VR LO and text", _raw_file(wrong_vr.file_meta, _explicit_le_body(wrong_vr),
                                                     tmp_path / "wrong_vr.dcm"), "refused")
    with GatewayProcess(tmp_path / "gw", model=tiny_model) as gw:
        code = send_raw(gw.port, case)
        failures = [e for e in gw.events() if e.get("event") == "instance_store_failed"]
    # A malformed dataset is a permanent failure (0xA900/0xC000), not "out of resources" (0xA700),
    # and it must be an anticipated refusal, not an exception caught by the listener's last resort.
    assert code in FAILURE_STATUSES, f"0x{code:04X}"
    assert failures == []
