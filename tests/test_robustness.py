"""Fuzzed input against a running gateway: every odd or broken instance gets an answer, none a crash.

A corpus of damaged, hostile and merely unusual instances is built here, sent over real DICOM
associations (pynetdicom, raw file bytes, no re-encoding) to `osteogate serve`, and then the
gateway must still echo, still store and classify a good study, have written nothing outside its
spool, and have sent only well-formed SRs (each parses and passes dciodvfy without "Error").
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
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
    DeflatedExplicitVRLittleEndian,
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


# -- memory bombs ------------------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def big_native_file(path: Path, pixel_bytes: int) -> Path:
    """A DX instance with ``pixel_bytes`` of zero pixels, written without holding them in memory."""
    ds = make_dataset()
    del ds.PixelData
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, ds.file_meta, enforce_standard=True)
        handle.write(_explicit_le_body(ds))
        handle.write(b"\xe0\x7f\x10\x00OW\0\0" + pixel_bytes.to_bytes(4, "little"))
        chunk = bytes(1 << 20)
        for _ in range(pixel_bytes // len(chunk)):
            handle.write(chunk)
        handle.write(bytes(pixel_bytes % len(chunk)))
    return path


def deflate_bomb(path: Path, inflated_bytes: int, **attrs: object) -> Path:
    from tests.test_ingest_integrity import deflated

    path.write_bytes(deflated(make_dataset(**attrs), extra_zeros=inflated_bytes))
    return path


def store_on_one_association(port: int, paths: list[Path], contexts: tuple[tuple[str, str], ...]) -> list[object]:
    """Statuses (the response datasets) of C-STOREs of raw files on one association, in order."""
    with association(port, contexts) as assoc:
        assert assoc.is_established
        return [assoc.send_c_store(path) for path in paths]


def test_bombs_are_refused_with_bounded_memory(tmp_path: Path, tiny_model: Path) -> None:
    """max_instance_mb = 2: a deflate bomb (300 MB inflated from ~0.3 MB), a 64 MB instance, a
    corrupt deflate stream, sequences nested 300 deep and a PDU header claiming 4 GB are each
    refused with the right status class, the association (or listener) goes on serving, and the
    serve process never holds more than 600 MB."""
    from tests.test_ingest_integrity import deflated, nested_sequences

    work = tmp_path / "bombs"
    work.mkdir()
    bomb = deflate_bomb(work / "bomb.dcm", 300 * 2**20)
    assert bomb.stat().st_size < 2 * 2**20
    big = big_native_file(work / "big.dcm", 64 * 2**20)
    good = write_dataset(make_dataset(study_uid=generate_uid()), work / "good.dcm")
    corrupt_bytes = bytearray(deflated(make_dataset()))
    corrupt_bytes[144 + int(pydicom.dcmread(good, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
                  + 2] ^= 0xFF
    corrupt = work / "corrupt.dcm"
    corrupt.write_bytes(bytes(corrupt_bytes))
    nested = work / "nested.dcm"
    nested.write_bytes(nested_sequences(300))
    deflate_cx = (DX, str(DeflatedExplicitVRLittleEndian))
    native_cx = (DX, str(ExplicitVRLittleEndian))

    env = {"OSTEOGATE_DICOM_MAX_INSTANCE_MB": "2"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env, stable_seconds=30) as gw:
        assert gw.proc is not None
        baseline = peak_rss_mb(gw.proc.pid)
        started = time.monotonic()
        responses = store_on_one_association(gw.port, [bomb, big, good], (deflate_cx, native_cx))
        codes = [int(r.Status) for r in responses]
        assert codes == [0xA700, 0xA700, 0x0000], [hex(c) for c in codes]
        assert "inflates to more than 2 MB" in responses[0].ErrorComment
        assert "larger than dicom.max_instance_mb" in responses[1].ErrorComment
        # Malformed is permanent (0xCxxx), never "out of resources" (the sender would retry forever).
        for path, cx in ((corrupt, deflate_cx), (nested, native_cx)):
            [response] = store_on_one_association(gw.port, [path], (cx,))
            assert int(response.Status) & 0xF000 == 0xC000, (path.name, hex(int(response.Status)))
        # A PDU header that announces 4 GB: the connection is closed, nothing is allocated.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
            raw.sendall(b"\x01\x00" + (0xFFFFFFF0).to_bytes(4, "big") + b"\0" * 64)
            assert raw.recv(16) == b""
        elapsed = time.monotonic() - started
        assert echoscu("127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        peak = peak_rss_mb(gw.proc.pid)
        events = gw.events()
    print(f"serve peak RSS {peak:.0f} MB (at start {baseline:.0f} MB); bombs handled in {elapsed:.1f} s")
    assert peak < 600, f"peak RSS {peak:.0f} MB"
    assert not [e for e in events if e.get("event") in ("instance_store_failed", "thread_crashed")]
    spooled = list((tmp_path / "gw" / "spool").rglob("*.dcm"))
    assert [p.stem for p in spooled] == [str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)]
    assert not [p for p in (tmp_path / "gw" / "spool" / ".incoming").rglob("*") if p.is_file()]


@pytest.mark.slow
def test_gigabyte_bombs_in_one_study_keep_memory_bounded(tmp_path: Path, tiny_model: Path) -> None:
    """The issue's figures: three 1.1 GB deflate bombs in one study, and a 288 MB instance, against
    max_instance_mb = 2 (they reached 6.5 GB and +490 MB of RSS before)."""
    work = tmp_path / "bombs"
    work.mkdir()
    study_uid = generate_uid()
    bombs = [deflate_bomb(work / f"bomb{i}.dcm", 1100 * 2**20, study_uid=study_uid) for i in range(3)]
    big = big_native_file(work / "big.dcm", 288 * 2**20)
    env = {"OSTEOGATE_DICOM_MAX_INSTANCE_MB": "2"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env, stable_seconds=2) as gw:
        assert gw.proc is not None
        responses = store_on_one_association(
            gw.port, [*bombs, big], ((DX, str(DeflatedExplicitVRLittleEndian)), (DX, str(ExplicitVRLittleEndian))))
        assert [int(r.Status) for r in responses] == [0xA700] * 4
        time.sleep(4)  # nothing was stored, so nothing reaches the worker either
        assert gw.studies() == []
        peak = peak_rss_mb(gw.proc.pid)
    print(f"serve peak RSS {peak:.0f} MB")
    assert peak < 600


# -- integrity over the network --------------------------------------------------------------------------------


def test_uid_conflicts_refused_and_transfer_syntax_duplicates_ignored(tmp_path: Path, dcmtk_pacs: StoreSCP,
                                                                    tiny_model: Path) -> None:
    """The issue's two cases end to end: a SOP Instance UID re-sent under another patient's study
    used to be accepted (and broke `replay` of the first study); the same instance in another
    transfer syntax used to make a new version and a second SR."""
    from pydicom.uid import RLELossless

    original = make_dataset(study_uid=generate_uid(), PatientID="PAT-A")
    first = write_dataset(original, tmp_path / "original.dcm")
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"]) as gw:
        assert send_raw(gw.port, Case("original", first, "accepted")) == SUCCESS
        dcmtk_pacs.wait_for_files("SR*.dcm", count=1, timeout=60)
        wait_until(lambda: gw.studies()[0]["delivered"] == "1/1", 30)

        # The same image, RLE Lossless (as a router might forward it): success, a duplicate.
        again = pydicom.dcmread(first)
        again.compress(RLELossless, generate_instance_uid=False)
        rle = write_dataset(again, tmp_path / "rle.dcm")
        assert send_raw(gw.port, Case("rle", rle, "accepted", contexts=((DX, str(RLELossless)),))) == SUCCESS

        # The same SOP Instance UID in another patient's study: refused, permanently, with the reason.
        thief = make_dataset(sop_uid=original.SOPInstanceUID, PatientID="PAT-B")
        with association(gw.port, ((DX, str(ExplicitVRLittleEndian)),)) as assoc:
            response = assoc.send_c_store(thief)
        assert int(response.Status) == 0xC001
        assert "already stored for another study" in response.ErrorComment

        time.sleep(3)  # stable_seconds is 1: a new version would be queued by now
        [row] = gw.studies()
        assert row["version"] == 1 and row["sr_versions"] == 1 and row["study_uid"] == original.StudyInstanceUID
        assert len(dcmtk_pacs.files("SR*.dcm")) == 1
        events = gw.events()
        assert [e for e in events if e.get("event") == "instance_uid_conflict"]
        assert original.SOPInstanceUID not in gw.log()
        # The first study is intact: it can be replayed from its own file.
        replay = gw.cli("replay", original.StudyInstanceUID, "--timeout", "60")
        assert "replayed 1 of 1" in replay.stdout, replay.stdout
