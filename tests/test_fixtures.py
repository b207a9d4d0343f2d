"""Proves the shared fixtures and helpers work: samples decode, dcmtk/Orthanc PACS receive what
is sent (untranscoded), the dcmtk PACS survives a restart on its port, PostgreSQL answers."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from tests.helpers import (
    SAMPLE_DIR,
    make_dataset,
    sample_file,
    sample_files,
    storescu,
    wait_until,
    write_dataset,
)
from tests.helpers.dcmtk import echoscu

EXPECTED_SAMPLES = {
    "knee_dx.dcm": ("DX", "KNEE", "MONOCHROME2"),
    "knee_dx_2.dcm": ("DX", "KNEE", "MONOCHROME2"),
    "spine_cr.dcm": ("CR", "LSPINE", "MONOCHROME2"),
    "knee_j2k.dcm": ("DX", "KNEE", "MONOCHROME2"),
    "knee_mono1.dcm": ("CR", "KNEE", "MONOCHROME1"),
    "chest_dx.dcm": ("DX", "CHEST", "MONOCHROME2"),
}


# ---------------------------------------------------------------------------- sample files


def test_sample_set_is_complete_and_small() -> None:
    files = {p.name: p for p in sample_files()}
    assert set(files) == set(EXPECTED_SAMPLES)
    sizes = [p.stat().st_size for p in files.values()]
    assert max(sizes) < 1_000_000
    assert sum(sizes) < 5_000_000


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLES))
def test_sample_decodes(name: str) -> None:
    modality, body_part, photometric = EXPECTED_SAMPLES[name]
    ds = pydicom.dcmread(sample_file(name))
    assert (ds.Modality, ds.BodyPartExamined, ds.PhotometricInterpretation) == (modality, body_part, photometric)
    assert ds.Manufacturer == "OsteoGate sample generator"
    assert ds.PatientID.startswith("DEMO")
    pixels = ds.pixel_array
    assert pixels.dtype == np.uint16
    assert pixels.shape == (ds.Rows, ds.Columns)
    assert 256 <= max(pixels.shape) <= 512
    assert int(pixels.max()) <= 4095 and np.ptp(pixels) > 1000  # 12 bits, real contrast
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_j2k_sample_is_compressed_and_lossless() -> None:
    ds = pydicom.dcmread(sample_file("knee_j2k"))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert ds.LossyImageCompression == "00"
    assert ds.pixel_array.shape == (512, 512)


def test_mono1_sample_has_voi_window() -> None:
    ds = pydicom.dcmread(sample_file("knee_mono1"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert float(ds.WindowWidth) > 0 and 0 < float(ds.WindowCenter) < 4095
    # MONOCHROME1: bone (high attenuation) is stored LOW; the knee's background air is the
    # majority of the frame, so the median stored value is high.
    assert np.median(ds.pixel_array) > 2048


def test_two_image_knee_study_and_distinct_studies() -> None:
    by_name = {p.name: pydicom.dcmread(p, stop_before_pixels=True) for p in sample_files()}
    a, b = by_name["knee_dx.dcm"], by_name["knee_dx_2.dcm"]
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.PatientID == b.PatientID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert len({ds.StudyInstanceUID for ds in by_name.values()}) == 5
    assert by_name["spine_cr.dcm"].StudyDescription == "XR LUMBAR SPINE 2 VIEWS"
    assert by_name["chest_dx.dcm"].StudyDescription == "XR CHEST PA"


def test_generator_is_deterministic(tmp_path: Path) -> None:
    from osteogate.sample_dicom.make_samples import DEFAULT_SOURCE, generate

    if not DEFAULT_SOURCE.is_dir():
        pytest.skip(f"knee source images not available at {DEFAULT_SOURCE}")
    for path in generate(DEFAULT_SOURCE, tmp_path):
        assert path.read_bytes() == (SAMPLE_DIR / path.name).read_bytes(), path.name


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLES))
def test_sample_passes_dciodvfy(name: str) -> None:
    proc = subprocess.run(["dciodvfy", str(sample_file(name))], capture_output=True, text=True, check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


# ------------------------------------------------------------------------- make_dataset


def test_make_dataset_gives_distinct_valid_instances(tmp_path: Path) -> None:
    a = make_dataset()
    b = make_dataset(body_part="LSPINE", modality="CR", PatientID="OTHER")
    assert len({a.StudyInstanceUID, b.StudyInstanceUID, a.SOPInstanceUID, b.SOPInstanceUID}) == 4
    assert b.BodyPartExamined == "LSPINE" and b.PatientID == "OTHER" and b.Modality == "CR"
    assert not np.array_equal(a.pixel_array, b.pixel_array)
    path = write_dataset(a, tmp_path / "sub" / "a.dcm")
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == a.SOPInstanceUID
    assert back.pixel_array.shape == (64, 64)
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        assert not [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]


def test_make_dataset_same_study_and_deletion() -> None:
    first = make_dataset()
    second = make_dataset(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                          InstanceNumber=2, BodyPartExamined=None)  # fmt: skip
    assert second.StudyInstanceUID == first.StudyInstanceUID
    assert second.InstanceNumber == 2
    assert "BodyPartExamined" not in second


def test_wait_until_returns_value_and_times_out() -> None:
    calls = iter([0, 0, 7])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.01) == 7
    with pytest.raises(TimeoutError):
        wait_until(lambda: False, timeout=0.2, interval=0.05)


# ------------------------------------------------------------------------------ dcmtk PACS


def test_echo_dcmtk_pacs(dcmtk_pacs) -> None:
    proc = echoscu(dcmtk_pacs.host, dcmtk_pacs.port, dcmtk_pacs.ae_title)
    assert proc.returncode == 0, proc.stderr


def _same_content(sent: Path, received: Path) -> None:
    a, b = pydicom.dcmread(sent), pydicom.dcmread(received)
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    assert b.PixelData == a.PixelData  # untranscoded: even encapsulated bytes are identical
    assert np.array_equal(a.pixel_array, b.pixel_array)
    assert a == b  # every data set element (file meta differs: storescp's implementation UID)


def test_storescu_samples_arrive_identical(dcmtk_pacs) -> None:
    files = sample_files()
    proc = storescu(files, dcmtk_pacs.host, dcmtk_pacs.port, dcmtk_pacs.ae_title)
    assert proc.returncode == 0, proc.stderr
    received = dcmtk_pacs.wait_for_files("*.dcm", count=len(files))
    assert len(received) == len(files)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received}
    for sent in files:
        _same_content(sent, by_uid[pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID])


def _jpeg_lossless(src: Path, dst: Path) -> Path:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg not installed")
    subprocess.run(["dcmcjpeg", "+e1", str(src), str(dst)], check=True, capture_output=True)
    return dst


@pytest.mark.parametrize("syntax", ["rle", "jpegls", "jpeg-lossless"])
def test_storescu_keeps_compressed_syntaxes(dcmtk_pacs, tmp_path: Path, syntax: str) -> None:
    """Mixed batch (uncompressed + one compressed syntax): each file arrives in its own syntax."""
    ds = make_dataset()
    compressed = tmp_path / f"{syntax}.dcm"
    if syntax == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)
        write_dataset(ds, compressed)
    elif syntax == "jpegls":
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
        write_dataset(ds, compressed)
    else:
        _jpeg_lossless(write_dataset(ds, tmp_path / "plain-src.dcm"), compressed)
    plain = write_dataset(make_dataset(), tmp_path / "plain.dcm")
    proc = storescu([plain, compressed], dcmtk_pacs.host, dcmtk_pacs.port, "PACS")
    assert proc.returncode == 0, proc.stderr
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                for p in dcmtk_pacs.wait_for_files(count=2)}  # fmt: skip
    for sent in (plain, compressed):
        _same_content(sent, received[pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID])


def test_dcmtk_pacs_restarts_on_same_port(dcmtk_pacs) -> None:
    port = dcmtk_pacs.port
    dcmtk_pacs.stop()
    down = storescu([sample_file("knee_dx")], dcmtk_pacs.host, port, "PACS")
    assert down.returncode != 0  # PACS down: the SCU must see a failure
    assert echoscu(dcmtk_pacs.host, port, "PACS").returncode != 0
    dcmtk_pacs.start()
    assert dcmtk_pacs.port == port
    up = storescu([sample_file("knee_dx")], dcmtk_pacs.host, port, "PACS")
    assert up.returncode == 0, up.stderr
    assert len(dcmtk_pacs.wait_for_files(count=1)) == 1


# ---------------------------------------------------------------------------- Orthanc PACS


@pytest.mark.orthanc
def test_orthanc_pacs_receives_sample(orthanc_pacs) -> None:
    assert echoscu(orthanc_pacs.host, orthanc_pacs.port, orthanc_pacs.ae_title).returncode == 0
    assert orthanc_pacs.instances() == []
    sent = sample_file("knee_j2k")
    proc = storescu([sent], orthanc_pacs.host, orthanc_pacs.port, orthanc_pacs.ae_title)
    assert proc.returncode == 0, proc.stderr
    [instance] = orthanc_pacs.wait_for_instances(count=1)
    original = pydicom.dcmread(sent)
    assert instance["MainDicomTags"]["SOPInstanceUID"] == original.SOPInstanceUID
    tags = orthanc_pacs.instance_tags(instance["ID"])
    assert tags["BodyPartExamined"] == "KNEE"
    stored = pydicom.dcmread(io.BytesIO(orthanc_pacs.instance_file(instance["ID"])))
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(stored.pixel_array, original.pixel_array)


# ------------------------------------------------------------------------------ PostgreSQL


@pytest.mark.postgres
def test_postgres_url_accepts_connections(postgres_url: str) -> None:
    import sqlalchemy as sa

    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == "osteogate"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_fresh_postgres_url_is_isolated(fresh_postgres_url: str, postgres_url: str) -> None:
    import sqlalchemy as sa

    assert fresh_postgres_url != postgres_url
    engine = sa.create_engine(fresh_postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar_one() == 1
    finally:
        engine.dispose()


def _minimal_sr(path: Path, sop_class: str) -> Path:
    """Just enough of an SR instance for a storage round trip (not a valid SR document)."""
    ds = make_dataset()
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):  # fmt: skip
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = "SR"
    return write_dataset(ds, path)


@pytest.mark.parametrize(
    "sop_class",
    ["1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"],
    ids=["comprehensive3d", "comprehensive", "enhanced"],
)
def test_dcmtk_pacs_accepts_sr(dcmtk_pacs, tmp_path: Path, sop_class: str) -> None:
    """The gateway returns TID 1500 as Comprehensive 3D SR: both storescu and storescp must
    handle SR classes that are not in dcmtk's default proposal list."""
    sr = _minimal_sr(tmp_path / "sr.dcm", sop_class)
    proc = storescu([sr], dcmtk_pacs.host, dcmtk_pacs.port, "PACS")
    assert proc.returncode == 0, proc.stderr
    [received] = dcmtk_pacs.wait_for_files("SR*.dcm", count=1)
    assert pydicom.dcmread(received).SOPClassUID == sop_class


def test_dcmtk_pacs_accepts_pynetdicom_sr(dcmtk_pacs, tmp_path: Path) -> None:
    """Same path the gateway's delivery uses: pynetdicom C-STORE of a Comprehensive 3D SR."""
    from pynetdicom import AE

    sr = pydicom.dcmread(_minimal_sr(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34"))
    ae = AE(ae_title="OSTEOGATE")
    ae.add_requested_context(sr.SOPClassUID, sr.file_meta.TransferSyntaxUID)
    assoc = ae.associate(dcmtk_pacs.host, dcmtk_pacs.port, ae_title=dcmtk_pacs.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(sr)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    dcmtk_pacs.wait_for_files("SR*.dcm", count=1)
