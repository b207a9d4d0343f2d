"""The three sample studies through the shipped model and the report builders (issue 16): the SR
(read with highdicom and dsr2html) and the card (read through its layout function) say one decision,
the estimate with the very interval of the SR's NUM, the estimate's WHO category, and what was read."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from osteogate.gateway.report import wording
from osteogate.gateway.report.card import layout_card
from osteogate.gateway.report.content import AlgorithmInfo, StudyReport
from osteogate.gateway.report.sr import build_result_sr, read_result
from osteogate.gateway.work.decoding import thumbnail
from osteogate.model.covariates import covariates_from_dataset
from osteogate.model.inference import Classifier
from osteogate.model.pixels import dataset_to_image

from tests.helpers import REPO_ROOT, SAMPLE_DIR
from tests.report_data import require, uid

SHIPPED = REPO_ROOT / "model" / "shipped" / "osteogate-knee.safetensors"
READ = "from age, sex, weight and height in the header; the radiograph was not used"
CASES = {
    # name: (files, decision head, estimate, interval, category words)
    "knee_dx": (("knee_dx.dcm", "knee_dx_2.dcm"), "BELOW REFERRAL THRESHOLD", "-1.2", ("-1.7", "-0.7"),
                "osteopenia range"),
    "knee_j2k": (("knee_j2k.dcm",), "DXA REFERRAL SUGGESTED", "-2.3", ("-2.8", "-1.8"), "osteopenia range"),
    "spine_cr": (("spine_cr.dcm",), "DXA REFERRAL SUGGESTED", "-2.7", ("-3.2", "-2.2"), "osteoporosis range"),
}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    return Classifier.load(SHIPPED, backend="onnx", cache_dir=tmp_path_factory.mktemp("cache"))


def report_for(classifier: Classifier, names: tuple[str, ...]) -> StudyReport:
    datasets = [pydicom.dcmread(SAMPLE_DIR / name) for name in names]
    region = "spine" if "spine" in names[0] else "knee"
    images = [dataset_to_image(ds) for ds in datasets]
    assessment = classifier.assess(classifier.score_images(images, [region] * len(images)),
                                   covariates_from_dataset(datasets[0]), region)
    card = classifier.card
    algorithm = AlgorithmInfo(card.display_name, card.version, classifier.sha256)
    headers = tuple(pydicom.dcmread(SAMPLE_DIR / n, stop_before_pixels=True) for n in names)
    return StudyReport(assessment, headers, algorithm, (), tuple(thumbnail(i) for i in images))


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_reads_as_one_result(classifier: Classifier, case: str, tmp_path: Path) -> None:
    names, head, estimate, (low, high), category = CASES[case]
    report = report_for(classifier, names)
    study = report.assessment.study
    interval = f"(80 % interval {low} to {high})" if head.startswith("DXA") else f"({low} to {high})"
    expected = f"{head} - estimated T-score {estimate} {interval}, {category}"
    headline = wording.headline(study)
    assert headline.startswith(expected) and headline.endswith(READ)
    assert ("cannot rule out low bone density" in headline) == head.startswith("BELOW")

    sr = build_result_sr(report, series_instance_uid=uid(f"{case}-sr-series"),
                         sop_instance_uid=uid(f"{case}-sr"), instance_number=1)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    reading = read_result(pydicom.dcmread(path))
    assert reading.summary.startswith(expected) and READ in reading.summary.split(". ")[0]
    group = reading.groups[0]
    # The NUM's uncertainty range reproduces the printed interval exactly.
    assert wording.interval_text(*group.t_interval) == (low, high) and wording.fmt_t_score(group.t_score) == estimate
    assert group.label == study.label and group.decision == study.decision
    assert reading.algorithm.startswith("osteogate-covariates ")  # never the knee image network
    assert "osteogate-knee" not in str(sr.ManufacturerModelName)
    validation = next(c for c in group.comments if c.startswith("Validation"))
    assert "155 patients of one public knee data set, ages 17-107" in validation
    evaluations = {e.name.meaning: e.value.meaning
                   for e in hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
                   .get_image_measurement_groups()[0].get_qualitative_evaluations()}
    assert evaluations["WHO category of the estimated T-score"].lower().startswith(category)
    assert evaluations["Recommended Follow-up"].lower() == head.lower().replace("below referral threshold",
                                                                                 "below the referral threshold")
    # dsr2html: the decision and the estimate in the first lines of the document body.
    require("dsr2html")
    html = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=30).stdout
    lines = [line.strip() for line in re.sub(r"<[^>]+>", "\n", html).splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith(head))
    assert first < 40 and expected in lines[first]

    text = " ".join(layout_card(report).text().split())
    assert expected in text and READ in text
    assert "regions the model analysed" not in text and "not used:" in text
    assert "Result by osteogate-covariates" in text
    assert "normal" not in text.lower().replace("abnormal", "")
