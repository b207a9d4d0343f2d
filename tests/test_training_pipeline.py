"""End to end on generated data: train (CV + final), checkpoint round trip, evaluate, export, weight sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from osteogate.model.card import ModelCard
from osteogate.model.checkpoint import load_checkpoint, read_card
from osteogate.training.cli import main
from osteogate.training.config import TrainConfig
from osteogate.training.engine import train_network
from osteogate.training.pool import build_pool
from osteogate.training.synthetic import make_synthetic_dataset

FAST = ["--arch", "osteogate_smallcnn", "--patch-size", "32", "--patches", "4", "--train-patches", "2",
        "--working-size", "64", "--batch-size", "8", "--lr", "0.01", "--no-progress", "--threads", "1",
        "--bootstrap", "50"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), per_class=6, size=72, spine=2, binary=4)


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "model.safetensors"
    cache = tmp_path_factory.mktemp("cache")
    config = out.parent / "train.toml"
    config.write_text("[train]\nepochs = 2\nfolds = 2\nmode = 'patches'\n[train.augment]\nrotate_limit = 5.0\n")
    code = main(["train", str(dataset), "--config", str(config), "--out", str(out), "--cache-dir", str(cache),
                 "--save-predictions", str(out.parent / "cv.npz"), *FAST])
    assert code == 0
    return out


def test_loss_falls_on_generated_data(dataset: Path, tmp_path: Path) -> None:
    pool = build_pool(dataset, working_size=64, cache_dir=tmp_path)
    config = TrainConfig(architecture="osteogate_smallcnn", patch_size=32, patches_per_image=4, train_patches=2,
                         working_size=64, epochs=6, batch_size=8, lr=0.01, patience=99, progress=False,
                         threads=1)
    card = ModelCard(architecture=config.architecture, input=config.input_spec())
    everything = np.arange(len(pool))
    result = train_network(pool, everything, everything, config, card, log=lambda _m: None)
    losses = result.history["train_loss"]
    assert min(losses[-2:]) < losses[0] * 0.8, losses


def test_checkpoint_and_card_round_trip(trained: Path) -> None:
    state, card = load_checkpoint(trained)
    assert card == read_card(trained) and card.trained
    assert card.architecture == "osteogate_smallcnn" and card.input.mode == "patches"
    assert card.temperature > 0 and "low_bmd" in card.thresholds
    cv = card.metrics["cross_validation"]["pooled_out_of_fold"]
    assert {"value", "ci_low", "ci_high"} <= set(cv["auc_low_bmd"])
    assert "ece_before_calibration" in cv
    assert card.training["data"]["regions"] == ["knee", "spine"]
    assert "no ImageNet" in card.weights_source or "from scratch" in card.weights_source
    assert card.training["config"]["augment"]["rotate_limit"] == 5.0  # TOML sub-table reached the config
    copy = json.loads(trained.with_name("model.card.json").read_text())
    assert copy["temperature"] == card.temperature
    for name in ("cv_confusion.png", "cv_roc.png", "cv_reliability.png", "training_curves.png"):
        assert (trained.parent / name).stat().st_size > 1000
    # The gateway's classifier serves it: knee and spine rows, probabilities sum to one.
    from osteogate.model.inference import Classifier

    classifier = Classifier.load(trained, backend="torch")
    image = np.random.default_rng(0).random((80, 70)).astype(np.float32)
    predictions = classifier.predict([image, image], ["knee", "spine"])
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in predictions)
    assert not classifier.untrained and state


def test_fusion_heads_ship_in_the_card_and_serve(trained: Path) -> None:
    """The synthetic covariates follow the T-score: the fused card carries heads for every input
    situation, with nested grouped-CV figures, and the classifier assesses studies with them."""
    card = read_card(trained)
    fusion = card.fusion
    assert fusion["format"] == 1 and fusion["image_regions"] == ["knee", "spine"]
    assert {"age", "age+sex+weight+height", "image", "image+age+sex+weight+height"} <= set(fusion["situations"])
    for entry in fusion["situations"].values():
        assert {"value", "ci_low", "ci_high"} <= set(entry["validation"]["auc_low_bmd"])
        assert entry["validation"]["n_images"] >= 12
        assert set(entry["inputs"]) <= set(entry["validation"].get("inputs", entry["inputs"]))
    assert fusion["covariate_ranges"]["age"][0] >= 20
    comparison = card.metrics["fusion_comparison"]
    methods = [row["method"] for row in comparison["table"]]
    assert methods[0].startswith("age alone") and any(m.startswith("OST") for m in methods)
    assert "fused_minus_covariates_only_auc_low_bmd" in comparison["paired_deltas"]
    for name in ("fusion_roc.png", "fusion_reliability.png", "fusion_t_scores.png", "fusion_table.md"):
        assert (trained.parent / name).stat().st_size > 500, name
    from osteogate.model.covariates import Covariates
    from osteogate.model.inference import Classifier

    classifier = Classifier.load(trained, backend="torch", device="cpu")
    image = np.random.default_rng(0).random((80, 70)).astype(np.float32)
    scores = classifier.score_images([image], ["knee"])
    result = classifier.assess(scores, Covariates(age_years=70, sex="F", weight_kg=60, height_m=1.6), "knee")
    study = result.study
    from osteogate.model.gate import image_path_reason

    image_ok = image_path_reason(card, "knee") is None  # the image is offered only where it was validated
    assert study.situation == ("image+" if image_ok else "") + "age+sex+weight+height"
    if study.assessed:  # on 20 synthetic images the CIs may well include chance: then "not assessed"
        low, high = study.t_score_interval
        assert low <= study.t_score <= high and study.label is not None
    else:
        assert study.label is None and study.reason


def test_evaluate_writes_json_and_plots(trained: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", str(trained), str(dataset), "--out", str(out), "--bootstrap", "50", "--gradcam", "3"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_images"] >= 18 and "auc_osteoporosis" in report["metrics"]
    for name in ("confusion.png", "roc.png", "reliability.png", "gradcam.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000, name


def test_export_onnx_parity(trained: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(trained), "--onnx", str(onnx_path)]) == 0
    assert onnx_path.stat().st_size > 10_000


def test_pretrained_offline_is_a_clear_error(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Force "offline" even where a network exists: an endpoint in the never-resolving .invalid TLD.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://osteogate-hub.invalid")
    args = ["train", str(dataset), "--out", str(tmp_path / "m.safetensors"), "--cache-dir", str(tmp_path),
            "--folds", "0", "--epochs", "1", "--pretrained", *FAST[2:]]
    assert main(args) == 69  # EX_UNAVAILABLE: the weights cannot be fetched here
    message = capsys.readouterr().err
    assert "--pretrained" in message and "--init-from" in message and "osteogate-hub.invalid" in message


def test_init_from_loads_a_local_file(trained: Path, dataset: Path, tmp_path: Path) -> None:
    state, _ = load_checkpoint(trained)
    config = TrainConfig(architecture="osteogate_smallcnn", patch_size=32, working_size=64, init_from=str(trained))
    from osteogate.training.networks import create_network

    card = ModelCard(architecture=config.architecture, input=config.input_spec())
    net, source = create_network(card, config)
    assert source == f"local file {trained.name}"
    loaded = net.state_dict()
    backbone = [k for k in state if k.startswith("backbone.") and state[k].dtype.is_floating_point]
    assert backbone and all(torch.equal(loaded[k], state[k]) for k in backbone)
    with pytest.raises(FileNotFoundError):
        create_network(card, TrainConfig(architecture="osteogate_smallcnn", init_from=str(tmp_path / "missing.pth")))


def test_compare_runs_texture_baseline_on_the_same_folds(trained: Path, dataset: Path, tmp_path: Path) -> None:
    from osteogate.training.compare import main as compare

    assert compare([str(dataset), "--out", str(tmp_path), "--folds", "2", "--working-size", "64", "--bootstrap", "20",
                    "--cache-dir", str(tmp_path / "cache"), "--predictions", f"net={trained.parent / 'cv.npz'}"]) == 0
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["method"] for row in table][1] == "net"
    assert table[0]["n_images"] == table[1]["n_images"]  # same evaluable images, same folds
    assert (tmp_path / "methods_roc.png").stat().st_size > 1000


def test_cv_only_writes_summary_without_a_model(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.safetensors"
    args = ["train", str(dataset), "--out", str(out), "--cache-dir", str(tmp_path), "--folds", "2", "--epochs", "1",
            "--cv-only", "--mode", "whole", "--size", "48", "--balance", "sampler", *FAST]
    assert main(args) == 0
    summary = json.loads((tmp_path / "cv_summary.json").read_text())
    assert summary["config"]["mode"] == "whole" and "cross_validation" in summary["metrics"]
    assert not out.exists()


def test_fusion_refit_from_saved_predictions(trained: Path, dataset: Path, tmp_path: Path) -> None:
    """`python -m osteogate.training.fusion_report`: the fusion stage alone, on an existing checkpoint."""
    from osteogate.model.inference import Classifier
    from osteogate.training.fusion_report import main as refit

    out = tmp_path / "refit"
    code = refit([str(dataset), "--image-cv", str(trained.parent / "cv.npz"), "--out", str(out), "--working-size", "64",
                  "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "30", "--checkpoint", str(trained),
                  "--version", "9.9.9"])
    assert code == 0
    written = out / trained.name
    state, card = load_checkpoint(written)
    original_state, original = load_checkpoint(trained)
    assert card.version == "9.9.9" and card.fusion["situations"] and "fusion" in card.training
    assert all(torch.equal(state[k], original_state[k]) for k in original_state)  # image weights untouched
    assert (out / "fusion_table.md").read_text().startswith("| method |")
    assert json.loads(written.with_name("model.card.json").read_text())["version"] == "9.9.9"
    Classifier.load(written, backend="torch", device="cpu")
