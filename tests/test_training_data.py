"""Data loading, leakage guard (dedup + conflict rule), grouped splits, audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from osteogate.training.data import DataError, Sample, binary_sources, load_samples, target_mask
from osteogate.training.dedup import near_duplicate_pairs, resolve_conflicts
from osteogate.training.pool import build_pool
from osteogate.training.splits import grouped_folds, holdout
from osteogate.training.synthetic import make_synthetic_dataset, synthetic_image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, per_class=4, size=64, spine=2, binary=4)


def test_manifest_and_folder_layouts_agree(dataset: Path, tmp_path: Path) -> None:
    from_manifest = load_samples(dataset)
    assert {s.region for s in from_manifest} == {"knee", "spine"}
    assert any(s.path.suffix == ".dcm" for s in from_manifest)
    (dataset.parent / "manifest.csv").rename(tmp_path / "moved.csv")  # force the folder-layout reader
    try:
        from_folders = load_samples(dataset.parent)
    finally:
        (tmp_path / "moved.csv").rename(dataset)
    assert sorted(s.path.name for s in from_folders) == sorted(s.path.name for s in from_manifest)
    by_name = {s.path.name: (s.label, s.region) for s in from_manifest}
    assert all(by_name[s.path.name] == (s.label, s.region) for s in from_folders)


def test_bad_label_is_a_clear_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,broken\n")
    with pytest.raises(DataError, match="broken"):
        load_samples(manifest)


def test_binary_sources_get_set_valued_targets() -> None:
    samples = [Sample(Path("a"), "osteopenia", source="full"), Sample(Path("b"), "osteoporosis", source="bin"),
               Sample(Path("c"), "normal", source="bin")]
    assert binary_sources(samples) == {"bin"}
    assert target_mask("osteoporosis", binary=True).tolist() == [False, True, True]
    assert target_mask("osteoporosis", binary=False).tolist() == [False, False, True]
    assert target_mask("normal", binary=True).tolist() == [True, False, False]


def test_pool_groups_exact_copies_and_decodes_dicom(dataset: Path, tmp_path: Path) -> None:
    pool = build_pool(dataset, working_size=64, cache_dir=tmp_path / "cache")
    names = [s.path.name for s in pool.samples]
    original = next(n for n in names if f"copy_of_{n}" in names)
    a, b = names.index(original), names.index(f"copy_of_{original}")
    assert pool.groups[a] == pool.groups[b]
    assert pool.dedup.exact_pairs >= 1
    dicom = next(i for i, s in enumerate(pool.samples) if s.path.suffix == ".dcm")
    assert pool.images[dicom].dtype == np.uint8 and pool.images[dicom].max() > 100  # bone block is bright
    summary = pool.summary()
    assert summary["regions"] == ["knee", "spine"] and len(summary["data_sha256"]) == 64


def test_near_duplicates_by_perceptual_hash() -> None:
    from osteogate.training.dedup import perceptual_hash

    rng = np.random.default_rng(1)
    image = synthetic_image("normal", 128, rng)
    noisy = np.clip(image.astype(int) + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
    other = np.rot90(synthetic_image("osteoporosis", 128, rng)).copy()
    hashes = np.stack([perceptual_hash(x) for x in (image, noisy, other)])
    pairs = near_duplicate_pairs(hashes, max_distance=4)
    assert (0, 1) in pairs and (0, 2) not in pairs


def test_conflict_rule_prefers_three_class_labels() -> None:
    samples = [
        Sample(Path("a"), "osteopenia", source="full"), Sample(Path("b"), "osteoporosis", source="bin"),  # resolved
        Sample(Path("c"), "normal", source="full"), Sample(Path("d"), "osteopenia", source="full"),  # dropped
        Sample(Path("e"), "normal", source="full"),  # no conflict
    ]
    groups = np.array([0, 0, 1, 1, 2])
    keep, conflicts = resolve_conflicts(samples, groups, {"bin"}, "resolve")
    assert keep.tolist() == [True, False, False, False, True]
    assert [c.action for c in conflicts] == ["resolved to osteopenia", "dropped"]
    keep, _ = resolve_conflicts(samples, groups, {"bin"}, "drop")
    assert keep.tolist() == [False, False, False, False, True]


@settings(max_examples=60, deadline=None)
@given(
    group_of=st.lists(st.integers(0, 14), min_size=12, max_size=60),
    labels=st.lists(st.sampled_from(["normal", "osteopenia", "osteoporosis"]), min_size=60, max_size=60),
    n_splits=st.integers(2, 5),
    seed=st.integers(0, 1000),
)
def test_a_group_never_sits_on_two_sides(group_of: list[int], labels: list[str], n_splits: int, seed: int) -> None:
    groups = np.array(group_of)
    strata = labels[: len(groups)]
    if len(np.unique(groups)) < n_splits:
        return
    folds = grouped_folds(strata, groups, n_splits, seed)
    seen_in_test = np.concatenate([test for _, test in folds])
    assert sorted(seen_in_test.tolist()) == list(range(len(groups)))  # every sample tested exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        if len(np.unique(groups[train])) >= 2:
            inner, held = holdout(train, strata, groups, 0.34, seed)
            assert not set(groups[inner]) & set(groups[held])
            assert sorted(np.concatenate([inner, held]).tolist()) == sorted(train.tolist())


def test_audit_table_lists_duplicates_and_balance(dataset: Path, tmp_path: Path) -> None:
    import contextlib
    import io

    from osteogate.training.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["dataset", "audit", str(dataset), "--working-size", "64", "--cache-dir", str(tmp_path)]) == 0
    text = out.getvalue()
    for word in ("synthetic3", "synthetic_binary", "osteopenia", "label conflicts", "width", "identical bytes", "perceptual hash"):
        assert word in text


def test_cli_import_is_cheap() -> None:
    """gateway/operate/cli.py imports training.cli on every call: no torch/numpy/sklearn at import time."""
    import subprocess
    import sys

    code = "import sys, training.cli; print(sorted(m for m in ('torch', 'numpy', 'sklearn') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_covariates_from_manifest_and_dicom_header(dataset: Path, tmp_path: Path) -> None:
    samples = load_samples(dataset)
    three_class = [s for s in samples if s.source == "synthetic3"]
    assert all(s.t_score is not None for s in three_class)
    assert all(s.covariates.present == ("age", "sex", "weight", "height") for s in three_class)
    from osteogate.model.taxonomy import class_from_t_score

    assert all(class_from_t_score(s.t_score) == s.label for s in three_class)
    assert all(s.covariates.present == () and s.t_score is None for s in samples if s.source == "synthetic_binary")
    # The DICOM file's manifest row has no covariates: they come from its header (serving's code).
    dicom = next(s for s in samples if s.path.suffix == ".dcm")
    import pydicom

    header = pydicom.dcmread(dicom.path, stop_before_pixels=True)
    assert dicom.covariates.age_years == float(str(header.PatientAge)[:3])
    assert dicom.covariates.weight_kg == float(header.PatientWeight)
    # Header first, the manifest fills the gaps; bad manifest values become missing, bad T-scores are errors.
    manifest = tmp_path / "m.csv"
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(synthetic_image("normal", 32, np.random.default_rng(0))).save(image)
    manifest.write_text("path,label,age,sex,weight_kg,height_m,t_score\n"
                        f"{image.name},normal,065Y,F,0,165,-0.5\n")
    (sample,) = load_samples(manifest)
    assert sample.covariates.age_years == 65.0 and sample.covariates.weight_kg is None
    assert sample.covariates.height_m == 1.65 and sample.t_score == -0.5
    assert any("centimetres" in n for n in sample.covariates.notes)
    manifest.write_text(f"path,label,t_score\n{image.name},normal,low\n")
    with pytest.raises(DataError, match="t_score 'low'"):
        load_samples(manifest)


def test_patch_sampler_uses_the_serving_rule() -> None:
    """Same candidates -> the same windows as model/preprocess.py's deterministic serving rule."""
    from dataclasses import replace

    from osteogate.model.card import InputSpec
    from osteogate.model.preprocess import box_stats, central_range, patch_positions, working_image
    from osteogate.training.inputs import PatchSampler

    rng = np.random.default_rng(3)
    image = (np.clip(rng.normal(0.3, 0.1, (150, 200)), 0, 1) * 255).astype(np.uint8)
    image[40:110, 60:120] = 220  # a bright "bone" block the rule must prefer
    spec = InputSpec(mode="patches", patch_size=32, patches_per_image=4, working_size=200, channels=1,
                     mean=(0.5,), std=(0.25,))
    sampler = PatchSampler(image, spec, stride=1)
    window_spec = replace(spec, patch_size=sampler.window, patches_per_image=5)
    array, _ = working_image(image.astype(np.float32) / 255.0, spec, sampler.window)
    serving = patch_positions(array, window_spec)
    # Serving's candidate grid, expressed as indices into the sampler's (stride 1) grid.
    (y0, y1), (x0, x1) = central_range(array.shape[0], sampler.window), central_range(array.shape[1], sampler.window)
    step = sampler.window // 2
    grid = [(y, x) for y in sorted({*range(y0, y1 + 1, step), y1}) for x in sorted({*range(x0, x1 + 1, step), x1})]
    index = {tuple(p): i for i, p in enumerate(sampler.positions.tolist())}
    assert sampler.choose(np.array([index[p] for p in grid]), 5) == serving
    # Scores are serving's window scores; random draws stay in the central region and on the block.
    mean, std = box_stats(array, sampler.window)
    y, x = sampler.positions[17]
    assert sampler.scores[17] == mean[y, x] + std[y, x]
    windows = sampler.sample(3, np.random.default_rng(0))
    assert windows.shape == (3, sampler.window, sampler.window) and windows.dtype == np.uint8
    assert all(w.mean() > image.mean() for w in windows)


@pytest.mark.parametrize(("argv", "code", "words"), [
    (["train", "{missing}", "--out", "{tmp}/x.safetensors"], 66, "no such file or folder"),
    (["dataset", "audit", "{missing}"], 66, "no such file or folder"),
    (["evaluate", "{missing}", "{missing}"], 66, "checkpoint not found"),
    (["export", "{missing}"], 66, "cannot read"),
    (["refit-site", "{garbage}", "--checkpoint", "{missing}", "--out", "{tmp}/site.safetensors"], 65,
     "is not a rows file written by `osteogate validate --export-rows`"),
], ids=["train", "audit", "evaluate", "export", "refit-site"])
def test_model_commands_fail_in_one_line_with_the_gateways_exit_codes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, words: str) -> None:
    from osteogate.training.cli import main

    garbage = tmp_path / "rows.npz"
    garbage.write_text("not numpy\n")
    values = {"missing": str(tmp_path / "absent"), "tmp": str(tmp_path), "garbage": str(garbage)}
    assert main([a.format(**values) for a in argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("osteogate: ") and words in err[-1], err
