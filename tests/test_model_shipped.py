"""The shipped checkpoint: its ONNX sibling (torch-free serving), its card, and the sample studies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from osteogate.model.checkpoint import checkpoint_sha256, read_card
from osteogate.model.covariates import covariates_from_dataset
from osteogate.model.estimand import BELOW_THRESHOLD, REFERRAL
from osteogate.model.fusion import situation_key
from osteogate.model.gate import image_path_reason, situation_reason
from osteogate.model.inference import SHA_KEY, Classifier
from osteogate.model.pixels import dataset_to_image
from osteogate.model.taxonomy import CLASSES, COVARIATES, REGIONS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "model" / "shipped" / "osteogate-knee.safetensors"
SAMPLES = ROOT / "sample_dicom"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Classifier:
    # An empty cache: the sibling must serve, nothing may be exported.
    return Classifier.load(SHIPPED, backend="onnx", cache_dir=tmp_path_factory.mktemp("empty-cache"))


def test_onnx_sibling_is_current_and_used(classifier, tmp_path):
    sibling = SHIPPED.with_suffix(".onnx")
    assert classifier.backend.path == sibling
    assert classifier.backend.metadata[SHA_KEY] == checkpoint_sha256(SHIPPED)
    from osteogate.model.export import check_parity

    assert check_parity(SHIPPED, sibling) < 1e-4


def test_card_lists_every_input_situation_with_figures():
    card = read_card(SHIPPED)
    assert card.classes == CLASSES and set(card.regions) <= set(REGIONS)
    situations = card.fusion["situations"]
    from itertools import combinations

    expected = {situation_key((*image, *covs)) for n in range(len(COVARIATES) + 1)
                for covs in combinations(COVARIATES, n) for image in ((), ("image",))} - {"none"}
    assert set(situations) == expected  # all covariates, some, none: every situation has its figures
    for key, entry in situations.items():
        assert {"value", "ci_low", "ci_high"} <= set(entry["validation"]["auc_low_bmd"])
        assert set(entry["inputs"]) <= set(key.split("+"))
    full = situations["image+age+sex+weight+height"]
    assert situation_reason(full, full["inputs"]) is None  # all covariates: demonstrated discrimination
    assert full["validation"]["target_sensitivity"] == card.fusion["target_sensitivity"]
    assert "sensitivity_low_bmd" in full["validation"] and "specificity_low_bmd" in full["validation"]
    assert "none" not in situations


def test_card_states_the_referral_rule_and_one_estimand_per_head():
    card = read_card(SHIPPED)
    rules = card.fusion["operating_rules"]
    assert rules["low_bmd"]["target"] == {"sensitivity": 0.9}
    assert "category of the estimate" in rules["osteoporosis"]["rule"]
    assert card.fusion["population"] == "155 patients of one public knee data set, ages 17-107"
    reported = set()
    for key, entry in card.fusion["situations"].items():
        v = entry["validation"]
        assert entry["classifier"]["kind"] == "normal_t" and entry["classifier"]["sigma"] > 0
        assert set(entry["thresholds"]) == {"low_bmd"}  # the osteoporosis range is the estimate's category
        points = v["operating_points"]
        assert points["low_bmd"]["rule"] == rules["low_bmd"]["rule"]
        assert points["low_bmd"]["threshold"] == entry["thresholds"]["low_bmd"]
        for name in ("low_bmd", "osteoporosis"):
            assert points[name]["sensitivity"] == v[f"sensitivity_{name}"]
            assert points[name]["specificity"] == v[f"specificity_{name}"]
        if situation_reason(entry, key.split("+")) is None:
            reported.add(key)
            assert v["sensitivity_low_bmd"]["value"] >= 0.85  # the referral keeps its sensitivity
            assert 0.7 <= v["pi80_coverage"]["value"] <= 0.9  # the calibrated interval covers ~80 %
    # Every situation with the age is reported; without it, none is.
    assert reported == {key for key in card.fusion["situations"] if "age" in key.split("+")}
    full = card.fusion["situations"]["age+sex+weight+height"]["validation"]
    assert full["auc_low_bmd"]["value"] >= 0.93


def study(classifier: Classifier, *names: str):
    datasets = [pydicom.dcmread(SAMPLES / name) for name in names]
    region = "spine" if "spine" in names[0] else "knee"
    scores = classifier.score_images([dataset_to_image(ds) for ds in datasets], [region] * len(datasets))
    return classifier.assess(scores, covariates_from_dataset(datasets[0]), region)


def test_knee_with_demographics_is_assessed(classifier):
    card = classifier.card
    result = study(classifier, "knee_dx.dcm", "knee_dx_2.dcm")
    available = ("image",) * (image_path_reason(card, "knee") is None) + COVARIATES
    entry = card.fusion["situations"][situation_key(available)]
    assert result.study.assessed and result.study.label in CLASSES
    assert result.study.inputs_used == tuple(entry["inputs"]) and result.study.inputs_missing == ()
    low, high = result.study.t_score_interval
    assert low < result.study.t_score < high
    # The SR and result card can state the operating points behind the label.
    points = result.study.validation["operating_points"]
    assert {"sensitivity", "specificity", "rule"} <= set(points["low_bmd"]) and "osteoporosis" in points
    assert len(result.images) == 2 and all(len(i.score.boxes) == card.input.patches_per_image for i in result.images)


@pytest.mark.parametrize(("names", "label", "decision", "estimate"), [
    # 40 y man; densitometry T-score -0.61: estimate -1.2 (osteopenia range), P(low) below the threshold.
    (("knee_dx.dcm", "knee_dx_2.dcm"), "osteopenia", BELOW_THRESHOLD, -1.2),
    # 64 y man, densitometry T-score -1.81 (osteopenia): estimate -2.3, osteopenia range, referred.
    (("knee_j2k.dcm",), "osteopenia", REFERRAL, -2.3),
    (("spine_cr.dcm",), "osteoporosis", REFERRAL, -2.7),  # invented demographics: 68 y woman, 61 kg
])
def test_sample_study_labels(classifier, names, label, decision, estimate):
    result = study(classifier, *names)
    assert result.study.assessed and result.study.label == label
    assert result.study.decision == decision and result.study.t_score == estimate
    assert result.study.model_name == "osteogate-covariates"
    # The image path is not assessed (knee: no discrimination; spine: untrained): all covariates.
    assert result.study.situation == "age+sex+weight+height"


def test_knee_without_demographics_gets_only_the_image_path(classifier):
    result = study(classifier, "knee_mono1.dcm")
    assert result.study.inputs_missing == COVARIATES
    reason = image_path_reason(classifier.card, "knee")
    assert result.study.assessed is (reason is None)
    if reason is not None:
        assert result.study.reason == reason and result.study.label is None


def test_spine_gets_the_covariates_only_estimate(classifier):
    result = study(classifier, "spine_cr.dcm")
    assert result.images[0].assessment.reason == "the spine image head is untrained on real data"
    assert result.study.assessed and "image" not in result.study.inputs_used


def test_serving_the_shipped_model_never_imports_torch():
    code = (
        "import sys, pydicom\n"
        "from osteogate.model.inference import Classifier\n"
        "from osteogate.model.covariates import covariates_from_dataset\n"
        "from osteogate.model.pixels import dataset_to_image\n"
        f"clf = Classifier.load({str(SHIPPED)!r}, backend='onnx', cache_dir='/nonexistent-osteogate-cache')\n"
        f"ds = pydicom.dcmread({str(SAMPLES / 'knee_dx.dcm')!r})\n"
        "result = clf.assess(clf.score_images([dataset_to_image(ds)], ['knee']), covariates_from_dataset(ds), 'knee')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(result.study.label)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in CLASSES
