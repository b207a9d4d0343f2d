"""A PACS (Orthanc) routes whole studies to the gateway, including what the gateway sent it.

PACS routing rules commonly forward a whole study, and by then the study holds the gateway's own
SR and result card, and whatever else the site stored (other series, PDF reports, other vendors'
SRs). Orthanc aborts the entire transfer if one SOP class is refused, so every standard storage
class must be acknowledged, and the gateway's own results must not start another round.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.gateway_harness import GatewayProcess
from tests.helpers import OrthancServer, make_dataset, wait_until, write_dataset

pytestmark = pytest.mark.orthanc


def _rest(orthanc: OrthancServer, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(orthanc.http_url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read()
    return json.loads(text) if text else None


def _upload(orthanc: OrthancServer, ds: Dataset, path: Path) -> None:
    write_dataset(ds, path)
    _rest(orthanc, "POST", "/instances", raw=path.read_bytes())


def _encapsulated_pdf(template: Dataset) -> Dataset:
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, keyword, template.get(keyword, ""))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DOC", 50, 1
    ds.Manufacturer, ds.ConversionType, ds.BurnedInAnnotation = "Report system", "WSD", "YES"
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240115", "100000", "20240115100000"
    ds.DocumentTitle, ds.MIMETypeOfEncapsulatedDocument = "Referral", "application/pdf"
    ds.ConceptNameCodeSequence = []
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_whole_study_from_pacs_with_our_sr_and_card_stores_all_and_makes_no_new_version(
        tmp_path: Path, orthanc_pacs: OrthancServer, tiny_model: Path) -> None:
    orthanc = orthanc_pacs
    study_uid, series_uid = generate_uid(), generate_uid()
    images = [make_dataset(study_uid=study_uid, series_uid=series_uid, InstanceNumber=n + 1) for n in range(2)]
    with GatewayProcess(tmp_path / "gw", model=tiny_model,
                        destinations=[f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}"]) as gw:
        _rest(orthanc, "PUT", "/modalities/gateway", {"AET": "OSTEOGATE", "Host": "127.0.0.1", "Port": gw.port})
        for n, ds in enumerate(images):
            _upload(orthanc, ds, tmp_path / f"image{n}.dcm")
        [orthanc_study] = _rest(orthanc, "POST", "/tools/lookup", raw=study_uid.encode())
        study_id = orthanc_study["ID"]

        # First route: images only. The gateway classifies and sends its SR and result card back
        # into the study.
        _rest(orthanc, "POST", "/modalities/gateway/store", {"Resources": [study_id], "Synchronous": True})
        wait_until(lambda: [r for r in gw.studies() if r["status"] == "done" and r["delivered"] == "1/1"], 90)
        wait_until(lambda: len(_rest(orthanc, "GET", f"/studies/{study_id}/instances")) == 4, 30)

        # Meanwhile the study gained a CT series, a PDF and a foreign SR.
        ct = make_dataset(study_uid=study_uid, modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                          SeriesNumber=7)
        # reports/ holds our SR and our result card; which one rglob lists first is up to the file
        # system, so pick the SR by its modality.
        [foreign_sr] = [ds for ds in map(pydicom.dcmread, sorted((tmp_path / "gw" / "reports").rglob("*.dcm")))
                        if ds.Modality == "SR"]
        foreign_sr.SOPInstanceUID = foreign_sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        foreign_sr.SeriesInstanceUID = generate_uid()
        foreign_sr.Manufacturer, foreign_sr.SeriesNumber = "Another AI vendor", 80
        for n, ds in enumerate([ct, _encapsulated_pdf(images[0]), foreign_sr]):
            _upload(orthanc, ds, tmp_path / f"extra{n}.dcm")
        assert len(_rest(orthanc, "GET", f"/studies/{study_id}/instances")) == 7

        # Second route: the whole study, everything in it. Orthanc fails the whole job (HTTP 500)
        # if a single instance is refused.
        answer = _rest(orthanc, "POST", "/modalities/gateway/store", {"Resources": [study_id], "Synchronous": True})
        assert answer.get("FailedInstancesCount", 0) == 0 and answer.get("InstancesCount") == 7, answer
        time.sleep(4)  # stable_seconds is 1: a new version would be under way by now
        [row] = gw.studies()
        events = gw.events()
        srs_in_orthanc = [i for i in _rest(orthanc, "GET", f"/studies/{study_id}/instances?expand")
                          if i["MainDicomTags"].get("SOPInstanceUID") and
                          _rest(orthanc, "GET", f"/instances/{i['ID']}/simplified-tags").get("Modality") == "SR"]
    assert row["version"] == 1 and row["sr_versions"] == 1 and row["instances"] == 2, row
    assert len(srs_in_orthanc) == 2  # ours, once, and the foreign one
    not_stored = [e for e in events if e.get("event") == "instance_not_stored"]
    assert sorted(e["outcome"] for e in not_stored) == ["out_of_scope"] * 3 + ["own_result"] * 2, not_stored
    duplicates = [e for e in events if e.get("event") == "instance_stored" and e.get("duplicate")]
    assert len(duplicates) == 2
    assert not [e for e in events if e.get("event") == "instance_refused"]
    assert len(list((tmp_path / "gw" / "spool").rglob("*.dcm"))) == 2


def test_conformance_lists_the_acknowledged_classes_exactly() -> None:
    """Table 3.2.2.2-c of CONFORMANCE.md is gateway.receive.validation.OUT_OF_SCOPE_SOP_CLASSES, row for row."""
    import re

    from osteogate.gateway.receive.validation import ACCEPTED_SOP_CLASSES, OUT_OF_SCOPE_SOP_CLASSES

    from tests.helpers import REPO_ROOT

    text = (REPO_ROOT / "deploy" / "CONFORMANCE.md").read_text(encoding="utf-8")
    table = text.split("Table 3.2.2.2-c", 1)[1].split("| --- | --- |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"\|\s*([0-9.]+)\s*\|\s*$", table, flags=re.MULTILINE)
    assert sorted(listed) == sorted(OUT_OF_SCOPE_SOP_CLASSES)
    assert not set(listed) & set(ACCEPTED_SOP_CLASSES)
