"""Hand-made source headers and model results for the SR and result-card tests.

``StudyAssessment`` objects are plain dataclasses (model/assessment.py), so the report builders are
tested on every kind of result (assessed, not assessed, with and without covariates) without a model.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from osteogate.gateway.report.sr import AlgorithmInfo, SkippedImage, StudyReport
from osteogate.model.assessment import Assessment, ImageAssessment, ImageScore, StudyAssessment
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import Z80, TScoreDistribution, category_from_probabilities, referral_decision
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

DX = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CR = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
ALGORITHM = AlgorithmInfo(
    name="OsteoGate fused knee model",
    version="2.1.0",
    checkpoint_sha256=hashlib.sha256(b"test checkpoint").hexdigest(),
)
ALL_INPUTS = ("image", "age", "sex", "weight", "height")
KNEE_P = {"normal": 0.125, "osteopenia": 0.25, "osteoporosis": 0.625}
OTHER_P = {"normal": 0.625, "osteopenia": 0.25, "osteoporosis": 0.125}
STUDY_P = {"normal": 0.2, "osteopenia": 0.7213, "osteoporosis": 0.0787}
COVARIATES = Covariates(age_years=67.4, sex="F", weight_kg=58.0, height_m=1.62)
NO_COVARIATES = Covariates(notes=("PatientAge, PatientBirthDate absent",))
UNDISCRIMINATING = "the image model shows no discrimination for knee (low-BMD AUC 95 % CI includes 0.5)"


def uid(label: str) -> UID:
    digest = hashlib.sha256(f"osteogate-test-report/{label}".encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def make_image(
    sop_class: UID,
    study: str,
    series: str,
    instance: str,
    body_part: str,
    laterality: str = "",
    *,
    minimal: bool = False,
    number: int = 1,
) -> Dataset:
    """A small radiograph with valid patient/study/series/image modules.

    `minimal` drops Type 2 attributes (accession, referring physician, birth date...) and the
    pixel module, as some modalities and header-only spool reads do.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid(instance)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(instance)
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(series)
    ds.Modality = "DX" if sop_class == DX else "CR"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST0001"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.BodyPartExamined = body_part
    if laterality:
        ds.ImageLaterality = laterality
    if minimal:
        return ds
    ds.PatientBirthDate = "19560101"
    ds.PatientSex = "F"
    ds.PatientAge = "067Y"
    ds.PatientWeight = "58"
    ds.PatientSize = "1.62"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR knee"
    ds.Manufacturer = "Test"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.ViewPosition = "AP"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 6
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(48, dtype=np.uint16).tobytes()
    return ds


REFERRAL_THRESHOLD = 0.7


def assessed(label: str, probabilities: dict[str, float], inputs: tuple[str, ...] = ALL_INPUTS,
             t_score: float | None = None, interval: tuple[float, float] | None = None,
             threshold: float = REFERRAL_THRESHOLD, **fields) -> Assessment:
    """An assessed result as the model makes it: with a T-score, every number from one distribution
    (Normal(t_score, sd), sd from the interval's width); without, the category of ``probabilities``.
    ``label`` states what the test expects: it must be the category that comes out."""
    missing = tuple(n for n in ALL_INPUTS if n not in inputs)
    if t_score is not None:
        low, high = interval if interval is not None else (t_score - 0.6, t_score + 0.6)
        dist = TScoreDistribution.from_regression(t_score, (high - low) / (2 * Z80))
        probabilities, category, p_low = dist.probabilities, dist.category, dist.p_low
        numbers = {"t_score": dist.estimate, "t_score_interval": dist.interval, "t_score_sd": dist.sd}
    else:
        category = category_from_probabilities(probabilities)
        p_low = probabilities["osteopenia"] + probabilities["osteoporosis"]
        numbers = {}
    assert category == label, f"{label} is not the category of these numbers ({category})"
    return Assessment(True, label=category, probabilities=probabilities, inputs_used=inputs, inputs_missing=missing,
                      decision=referral_decision(p_low, threshold), referral_threshold=threshold,
                      **numbers, **fields)


def not_assessed(reason: str = UNDISCRIMINATING, inputs: tuple[str, ...] = ("image",)) -> Assessment:
    return Assessment(False, reason=reason, inputs_used=inputs,
                      inputs_missing=tuple(n for n in ALL_INPUTS if n not in inputs))


def image_result(assessment: Assessment, probabilities: dict[str, float] = KNEE_P, region: str = "knee",
                 boxes: tuple[tuple[float, float, float, float], ...] = ((0.2, 0.3, 0.8, 0.7),)) -> ImageAssessment:
    return ImageAssessment(region, assessment, ImageScore(region, probabilities, boxes=boxes))


def fake_radiograph(height: int = 300, width: int = 240, seed: int = 0) -> np.ndarray:
    """A knee-ish grey picture: two bright 'bones' and noise, uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = 40 + 20 * rng.random((height, width))
    image += 150 * (np.abs(x - width / 2) < width / 6) * ((y < height * 0.45) | (y > height * 0.55))
    return np.clip(image, 0, 255).astype(np.uint8)


def knee_report(
    study: Assessment | None = None,
    images: tuple[ImageAssessment, ...] | None = None,
    covariates: Covariates = COVARIATES,
    sources: tuple[Dataset, ...] | None = None,
    skipped: tuple[SkippedImage, ...] = (),
    thumbnails: bool = True,
) -> StudyReport:
    """Two knee views (right, left) of one study; by default an assessed osteopenia result."""
    if sources is None:
        sources = (make_image(DX, "study-a", "series-dx", "knee-r", "KNEE", "R", number=1),
                   make_image(DX, "study-a", "series-dx", "knee-l", "KNEE", "L", number=2))
    if images is None:
        images = (image_result(assessed("osteoporosis", KNEE_P, ("image",))),
                  image_result(not_assessed(), OTHER_P))[: len(sources)]
    study = study or assessed("osteopenia", STUDY_P, ALL_INPUTS, -1.83, (-2.61, -1.02))
    assessment = StudyAssessment("knee", study, images, covariates)
    thumbs = tuple(fake_radiograph(seed=i) for i in range(len(sources))) if thumbnails else ()
    return StudyReport(assessment, sources, ALGORITHM, skipped, thumbs)


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"system tool(s) missing: {', '.join(missing)} (install dcmtk / dicom3tools)")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines (warnings are printed, shown with -s or on failure)."""
    require("dciodvfy")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    for line in lines:
        print(line)
    return [line for line in lines if line.startswith("Error")]


# -- a small checkpoint whose card the gate lets speak for some input situations only ----------------

GOOD_AUC = {"value": 0.93, "ci_low": 0.89, "ci_high": 0.96}
CHANCE_AUC = {"value": 0.5, "ci_low": 0.37, "ci_high": 0.63}


def _situation(inputs: tuple[str, ...], auc: dict[str, float]) -> dict:
    """A fusion head (model/fusion.py schema): the T-score falls with age; figures as given."""
    from osteogate.model.fusion import features_for

    names = features_for(inputs)
    centers = {"age": 55.0, "age_over_50": 8.0, "age_over_65": 2.0, "female": 0.5, "weight": 70.0, "height": 1.65,
               "bmi": 25.0}
    return {
        "inputs": list(inputs), "features": list(names), "center": [centers.get(n, 0.0) for n in names],
        "scale": [10.0] * len(names),
        "classifier": {"kind": "ordinal_t", "sigma": 0.45},
        "regression": {"coef": [-0.6 if n == "age" else -0.05 for n in names], "intercept": -1.6,
                       "residual_sd": 0.45, "residual_quantiles": [-0.55, 0.5]},
        "thresholds": {"low_bmd": 0.6, "osteoporosis": 0.35},
        "validation": {"auc_low_bmd": auc, "n_images": 167, "evaluated_on": "m7md_knee3class, 5 grouped folds"},
    }


def fused_checkpoint(path: Path, image_auc: dict[str, float] = CHANCE_AUC) -> Path:
    """A trained-looking small-CNN checkpoint with fusion heads: situations with age discriminate
    (grouped-CV AUC CI above chance); the image alone has ``image_auc``: at chance (the default),
    a study without header demographics must come out "not assessed". Weights are random: only the
    card's figures matter."""
    from itertools import combinations

    import torch
    from osteogate.model.card import InputSpec, ModelCard
    from osteogate.model.checkpoint import save_checkpoint
    from osteogate.model.export import export_onnx
    from osteogate.model.fusion import FUSION_FORMAT, situation_key
    from osteogate.model.network import build_network
    from osteogate.model.taxonomy import COVARIATES

    situations: dict[str, dict] = {"image": _situation(("image",), image_auc)}
    for n in range(1, len(COVARIATES) + 1):
        for covariates in combinations(COVARIATES, n):
            auc = GOOD_AUC if "age" in covariates else CHANCE_AUC
            situations[situation_key(covariates)] = _situation(covariates, auc)
            # The image adds nothing measurable: the head with the image available leaves it out.
            situations[situation_key(("image", *covariates))] = _situation(covariates, auc) | {
                "note": "image not used: it added nothing measurable in grouped validation"}
    card = ModelCard(
        name="osteogate-test-fused", version="9.1.0", architecture="osteogate_smallcnn", trained=True,
        input=InputSpec(mode="whole", size=64, channels=1, mean=(0.5,), std=(0.25,)),
        training={"data": {"regions": ["knee"]}},
        metrics={"cross_validation": {"pooled_out_of_fold": {"auc_low_bmd": image_auc}}},
        fusion={"format": FUSION_FORMAT, "image_regions": ["knee"], "situations": situations,
                "covariate_ranges": {"age": [17, 107], "weight": [35, 130], "height": [1.3, 2.0], "bmi": [15, 45]}},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_network(card)
    save_checkpoint(path, network.state_dict(), card)
    export_onnx(path)
    return path
