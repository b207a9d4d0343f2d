"""Classifier.score_images + Classifier.assess on real (small) checkpoints: boxes, fusion, the gate."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from osteogate.model.assessment import Assessment, ImageScore
from osteogate.model.card import InputSpec, ModelCard
from osteogate.model.checkpoint import save_checkpoint
from osteogate.model.covariates import Covariates
from osteogate.model.fusion import FUSION_FORMAT, features_for, situation_key
from osteogate.model.inference import Classifier
from osteogate.model.network import build_network
from osteogate.model.preprocess import extract_patches_with_boxes, resize_long_side
from osteogate.model.taxonomy import COVARIATES, TaxonomyError

SPEC = InputSpec(mode="patches", patch_size=32, patches_per_image=3, working_size=128, channels=1,
                 mean=(0.5,), std=(0.25,))
CHANCE = {"value": 0.5, "ci_low": 0.37, "ci_high": 0.63}
GOOD = {"value": 0.93, "ci_low": 0.89, "ci_high": 0.96}


def checkpoint(path: Path, **card_changes) -> Path:
    fields = {"architecture": "osteogate_smallcnn", "input": SPEC, "trained": True,
              "training": {"data": {"regions": ["knee"]}},
              "metrics": {"cross_validation": {"pooled_out_of_fold": {"auc_low_bmd": CHANCE}}},
              "thresholds": {"low_bmd": 0.5, "osteoporosis": 0.4}}
    fields.update(card_changes)
    card = ModelCard(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_network(card)
    with torch.no_grad():
        for head in network.heads.values():
            head.weight.mul_(20.0)  # spread the outputs: equal probabilities would make checks trivial
    save_checkpoint(path, network.state_dict(), card)
    return path


def radiograph(seed: int, shape: tuple[int, int] = (200, 150)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    bone = np.exp(-(((xx - shape[1] * (0.4 + 0.2 * rng.random())) / (shape[1] * 0.15)) ** 2))
    return np.clip(0.15 + 0.6 * bone + 0.05 * rng.standard_normal(shape), 0, 1).astype(np.float32)


def entry(inputs: tuple[str, ...], auc: dict[str, float], age_coef: float = -0.6) -> dict:
    """A fusion head: T-score falls with age; the image feature pushes towards low BMD."""
    names = features_for(inputs)
    coef = [age_coef if n == "age" else (-0.3 if n == "image_low_bmd" else -0.05) for n in names]
    center = [{"age": 55.0, "age_over_50": 8.0, "age_over_65": 2.0, "female": 0.5, "weight": 70.0, "height": 1.65,
               "bmi": 25.0}.get(n, 0.0) for n in names]
    return {
        "inputs": list(inputs), "features": list(names), "center": center, "scale": [10.0] * len(names),
        "classifier": {"kind": "ordinal_t", "sigma": 0.45},
        "regression": {"coef": coef, "intercept": -1.6, "residual_sd": 0.45, "residual_quantiles": [-0.55, 0.5]},
        "thresholds": {"low_bmd": 0.6, "osteoporosis": 0.35},
        "validation": {"auc_low_bmd": auc, "auc_osteoporosis": auc, "n_images": 167, "target_sensitivity": 0.9},
    }


def fusion(image_auc: dict[str, float] = CHANCE) -> dict:
    """Every situation; age-bearing ones discriminate, the others sit at chance; the image is left
    out of a head when it adds nothing, as training/fusion.py does."""
    situations = {}
    for n in range(len(COVARIATES) + 1):
        for covs in combinations(COVARIATES, n):
            auc = GOOD if "age" in covs else CHANCE
            if covs:
                situations[situation_key(covs)] = entry(covs, auc)
                with_image = entry(covs, auc) | {"note": "image not used: adds nothing measurable"}
                situations[situation_key(("image", *covs))] = with_image
            else:
                situations["image"] = entry(("image",), image_auc)
    return {"format": FUSION_FORMAT, "image_regions": ["knee"], "situations": situations,
            "covariate_ranges": {"age": [17, 107], "weight": [35, 130], "height": [1.3, 2.0], "bmi": [15, 45]}}


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Classifier:
    return Classifier.load(checkpoint(tmp_path_factory.mktemp("legacy") / "m.safetensors"), backend="torch", device="cpu")


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Classifier:
    path = checkpoint(tmp_path_factory.mktemp("fused") / "m.safetensors", fusion=fusion())
    return Classifier.load(path, backend="torch", device="cpu")


FULL = Covariates(age_years=68, sex="F", weight_kg=58, height_m=1.6)


def test_score_images_boxes_and_incremental_calls(legacy):
    images = [radiograph(0), radiograph(1, (90, 240)), radiograph(2, (20, 30))]
    scores = legacy.score_images(images, ["knee", "knee", "spine"], batch_size=2)
    one_by_one = [legacy.score_images([image], [region])[0]
                  for image, region in zip(images, ["knee", "knee", "spine"], strict=True)]
    for batched, single in zip(scores, one_by_one, strict=True):  # batch composition changes float rounding only
        assert batched.boxes == single.boxes and batched.region == single.region
        np.testing.assert_allclose(list(batched.probabilities.values()), list(single.probabilities.values()), atol=1e-6)
    for score in scores:
        assert isinstance(score, ImageScore) and score.n_inputs == 3 and len(score.boxes) == 3
        assert sum(score.probabilities.values()) == pytest.approx(1.0)
        assert len(score.features) == 3
        for x0, y0, x1, y1 in score.boxes:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert len({tuple(s.probabilities.values()) for s in scores}) == 3
    # The boxes are where the patches came from: cropping the resized source there gives the patch.
    image = images[0]
    patches, boxes = extract_patches_with_boxes(image, SPEC)
    resized = resize_long_side(image, SPEC.working_size)
    h, w = resized.shape
    for patch, (x0, y0, x1, y1) in zip(patches, boxes, strict=True):
        crop = resized[round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)]
        np.testing.assert_allclose(crop, patch, atol=1e-6)
    assert legacy.score_images([], []) == []
    with pytest.raises(ValueError, match="region 'hip'"):
        legacy.score_images([image], ["hip"])


def test_predict_still_works(legacy):
    predictions = legacy.predict([radiograph(0)], ["knee"])
    assert predictions[0].label in ("normal", "osteopenia", "osteoporosis")


def test_legacy_card_without_discrimination_is_never_assessed(legacy):
    scores = legacy.score_images([radiograph(0), radiograph(1)], ["knee", "knee"])
    result = legacy.assess(scores, FULL, "knee")
    assert not result.study.assessed and result.study.label is None
    assert "no covariate model in this checkpoint" in result.study.reason
    assert "no demonstrated discrimination for the knee image alone" in result.study.reason
    for image in result.images:
        assert not image.assessment.assessed and "0.37-0.63" in image.assessment.reason
        assert image.score is not None
    bare = legacy.assess(scores, Covariates(), "knee")
    assert not bare.study.assessed and "no usable age, sex, weight or height" in bare.study.reason
    spine = legacy.assess(legacy.score_images([radiograph(3)], ["spine"]), FULL, "spine")
    assert spine.images[0].assessment.reason == "the spine image head is untrained on real data"
    assert spine.images[0].assessment.validation == {}
    assert not spine.study.assessed


def test_legacy_card_with_discrimination_reports_the_image(tmp_path):
    path = checkpoint(tmp_path / "good.safetensors",
                      metrics={"cross_validation": {"pooled_out_of_fold": {"auc_low_bmd": GOOD}}})
    clf = Classifier.load(path, backend="torch", device="cpu")
    scores = clf.score_images([radiograph(0)], ["knee"])
    result = clf.assess(scores, Covariates(), "knee")
    assert result.images[0].assessment.assessed and result.study.assessed
    assert result.study.inputs_used == ("image",) and result.study.label == clf.predict([radiograph(0)], ["knee"])[0].label
    assert result.study.validation["auc_low_bmd"] == GOOD
    assert result.study.inputs_missing == COVARIATES


def test_fused_all_covariates(fused):
    scores = fused.score_images([radiograph(0)], ["knee"])
    result = fused.assess(scores, FULL, "knee")
    study = result.study
    assert study.assessed and study.label in ("osteopenia", "osteoporosis")  # 68-year-old woman
    assert study.situation == "age+sex+weight+height"  # image not validated: situation without it
    assert study.inputs_used == ("age", "sex", "weight", "height") and study.inputs_missing == ()
    low, high = study.t_score_interval
    assert low < study.t_score < high
    assert sum(study.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert study.validation["auc_low_bmd"] == GOOD
    assert any("image not used: no demonstrated discrimination" in n for n in study.notes)
    assert not result.images[0].assessment.assessed


def test_fused_older_means_lower_t_score(fused):
    young = fused.assess([], Covariates(age_years=30, sex="F"), "knee").study
    old = fused.assess([], Covariates(age_years=80, sex="F"), "knee").study
    assert young.assessed and old.assessed and young.t_score > old.t_score
    assert young.inputs_missing == ("weight", "height", "image")


def test_fused_missing_covariates_pick_their_situation(fused):
    scores = fused.score_images([radiograph(0)], ["knee"])
    partial = fused.assess(scores, Covariates(age_years=60, weight_kg=70), "knee").study
    assert partial.assessed and partial.situation == "age+weight" and partial.inputs_missing == ("sex", "height")
    sex_only = fused.assess(scores, Covariates(sex="M"), "knee").study
    assert not sex_only.assessed and "no demonstrated discrimination for the inputs sex" in sex_only.reason
    nothing = fused.assess(scores, Covariates(), "knee").study
    assert not nothing.assessed and "no demonstrated discrimination for the knee image alone" in nothing.reason
    empty = fused.assess([], Covariates(), "knee").study
    assert not empty.assessed and "no usable inputs" in empty.reason


def test_spine_gets_the_covariates_only_estimate(fused):
    scores = fused.score_images([radiograph(4)], ["spine"])
    result = fused.assess(scores, FULL, "spine")
    assert result.study.assessed and "image" not in result.study.inputs_used
    assert result.images[0].assessment.reason == "the spine image head is untrained on real data"
    assert any("spine image head is untrained" in n for n in result.study.notes)
    no_covariates = fused.assess(scores, Covariates(), "spine")
    assert not no_covariates.study.assessed
    assert no_covariates.study.reason == "the spine image head is untrained on real data"


def test_out_of_range_age_is_not_used(fused):
    child = fused.assess([], Covariates(age_years=9, sex="F", weight_kg=30, height_m=1.35), "knee").study
    assert "age" not in child.inputs_used and "age" in child.inputs_missing
    assert any("age outside the validated range 17-107" in n for n in child.notes)
    assert not child.assessed  # what is left (sex, weight, height) never discriminated


def test_validated_image_is_fused(tmp_path):
    path = checkpoint(tmp_path / "img.safetensors", fusion=fusion(image_auc=GOOD))
    clf = Classifier.load(path, backend="torch", device="cpu")
    scores = clf.score_images([radiograph(0), radiograph(1)], ["knee", "knee"])
    result = clf.assess(scores, Covariates(), "knee")
    assert result.study.assessed and result.study.inputs_used == ("image",) and result.study.situation == "image"
    assert all(i.assessment.assessed and i.assessment.inputs_used == ("image",) for i in result.images)
    # The study pools its images: its estimate lies between the two single-image estimates.
    singles = sorted(i.assessment.t_score for i in result.images)
    assert singles[0] - 0.01 <= result.study.t_score <= singles[1] + 0.01
    with_covariates = clf.assess(scores, FULL, "knee").study
    assert with_covariates.situation == "image+age+sex+weight+height"
    assert "image" not in with_covariates.inputs_used  # this card's head leaves it out, and says so
    assert "image not used: adds nothing measurable" in with_covariates.notes


def test_card_taxonomy_and_fusion_are_checked_at_load(tmp_path):
    wrong = checkpoint(tmp_path / "wrong.safetensors", classes=("osteoporosis", "osteopenia", "normal"))
    with pytest.raises(TaxonomyError, match="classes"):
        Classifier.load(wrong, backend="torch", device="cpu")
    hip = checkpoint(tmp_path / "hip.safetensors", regions=("knee", "hip"))
    with pytest.raises(TaxonomyError, match="hip"):
        Classifier.load(hip, backend="torch", device="cpu")
    broken = fusion()
    broken["situations"]["age"]["center"] = [1.0]
    bad = checkpoint(tmp_path / "bad.safetensors", fusion=broken)
    with pytest.raises(ValueError, match="situation 'age'"):
        Classifier.load(bad, backend="torch", device="cpu")


def test_assess_arguments(fused):
    scores = fused.score_images([radiograph(0)], ["knee"])
    with pytest.raises(ValueError, match="scores of region"):
        fused.assess(scores, FULL, "spine")
    with pytest.raises(ValueError, match="region 'hip'"):
        fused.assess([], FULL, "hip")
    assert fused.assess(scores, None, "knee").covariates == Covariates()


def test_assessment_invariants():
    with pytest.raises(ValueError):
        Assessment(assessed=True)
    with pytest.raises(ValueError):
        Assessment(assessed=False, label="normal", reason="x")
    with pytest.raises(ValueError):
        Assessment(assessed=False)
