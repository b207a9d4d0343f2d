"""model/export.py + model/inference.py: ONNX parity, backend agreement, torch-free CPU path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from osteogate.model.card import InputSpec, ModelCard
from osteogate.model.checkpoint import save_checkpoint
from osteogate.model.export import check_parity, export_onnx
from osteogate.model.inference import Classifier, Prediction
from osteogate.model.network import build_network

SMALL = "osteogate_smallcnn"


def make_checkpoint(path: Path, card: ModelCard, seed: int = 0, head_scale: float = 30.0) -> Path:
    """Random weights with enlarged heads so the logits differ clearly between classes and images
    (a plain random init gives near-uniform probabilities, which would make agreement checks trivial)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(card)
    with torch.no_grad():
        for head in network.heads.values():
            head.weight.mul_(head_scale)
    save_checkpoint(path, network.state_dict(), card)
    return path


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for shape in [(300, 200), (150, 260), (256, 256)]:
        base = np.linspace(0, 1, shape[0] * shape[1], dtype=np.float32).reshape(shape)
        out.append(np.clip(base * rng.random() + 0.3 * rng.random(shape, dtype=np.float32), 0, 1))
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    path = make_checkpoint(root / "small.safetensors", ModelCard(architecture=SMALL, input=InputSpec(size=96)))
    export_onnx(path)
    return path


def test_export_metadata_and_parity(small):
    import onnx

    onnx_path = small.with_suffix(".onnx")
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    from osteogate.model.checkpoint import checkpoint_sha256, read_card

    assert meta["osteogate.checkpoint_sha256"] == checkpoint_sha256(small)
    assert ModelCard.from_json(meta["osteogate.card"]) == read_card(small)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    assert check_parity(small, onnx_path) < 1e-4


def test_efficientnet_export_parity(tmp_path):
    card = ModelCard(architecture="efficientnet_b0", input=InputSpec(size=64))
    path = make_checkpoint(tmp_path / "eff.safetensors", card, head_scale=5.0)
    onnx_path = export_onnx(path, tmp_path / "out" / "eff.onnx", opset=17)
    assert check_parity(path, onnx_path, atol=1e-4) < 1e-4


def test_backends_agree_and_dynamic_batch(small):
    onnx_clf = Classifier.load(small, backend="onnx")
    torch_clf = Classifier.load(small, backend="torch", device="cpu")
    assert onnx_clf.backend_name == "onnxruntime-cpu" and torch_clf.backend_name == "torch-cpu"
    assert onnx_clf.untrained and onnx_clf.sha256 == torch_clf.sha256
    regions = ["knee", "spine", "knee"]
    a = onnx_clf.predict(images(), regions, batch_size=2)  # batches of 2 then 1: dynamic batch axis
    b = torch_clf.predict(images(), regions, batch_size=8)
    for pa, pb in zip(a, b, strict=True):
        assert isinstance(pa, Prediction) and pa.region == pb.region
        assert list(pa.probabilities) == ["normal", "osteopenia", "osteoporosis"]
        assert abs(sum(pa.probabilities.values()) - 1.0) < 1e-6
        for name in pa.probabilities:
            assert abs(pa.probabilities[name] - pb.probabilities[name]) < 1e-4
        assert pa.label == max(pa.probabilities, key=pa.probabilities.get)
    spread = np.std([list(p.probabilities.values()) for p in a])
    assert spread > 0.05  # not uniform: the agreement above is meaningful
    timings = onnx_clf.last_timings
    assert timings["n_images"] == 3 and timings["model_ms"] > 0 and timings["preprocess_ms"] >= 0


def test_region_selects_head(small):
    clf = Classifier.load(small, backend="onnx")
    image = images()[0]
    knee, spine = clf.predict([image, image], ["knee", "spine"])
    assert knee.probabilities != spine.probabilities
    with pytest.raises(ValueError, match="region 'hip'"):
        clf.predict([image], ["hip"])
    with pytest.raises(ValueError, match="2 images but 1 regions"):
        clf.predict([image, image], ["knee"])
    assert clf.predict([], []) == []


def test_patches_mode_and_temperature(tmp_path):
    spec = InputSpec(mode="patches", patch_size=64, patches_per_image=3, working_size=192)
    cold = make_checkpoint(tmp_path / "cold.safetensors", ModelCard(architecture=SMALL, input=spec))
    hot = make_checkpoint(tmp_path / "hot.safetensors",
                          ModelCard(architecture=SMALL, input=spec, temperature=50.0))
    a = Classifier.load(cold, backend="onnx", cache_dir=tmp_path / "cache")
    b = Classifier.load(cold, backend="torch", device="cpu")
    c = Classifier.load(hot, backend="onnx", cache_dir=tmp_path / "cache")
    pa, pb, pc = (clf.predict(images()[:2], ["knee", "spine"]) for clf in (a, b, c))
    assert a.last_timings["n_inputs"] == 6 and pa[0].n_inputs == 3
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_allclose(list(x.probabilities.values()), list(y.probabilities.values()), atol=1e-4)
    # Temperature 50 flattens the distribution towards uniform.
    for x, z in zip(pa, pc, strict=True):
        assert max(z.probabilities.values()) < max(x.probabilities.values())
        assert max(z.probabilities.values()) - 1 / 3 < 0.1


def test_stale_sibling_is_reexported_into_cache(tmp_path):
    card = ModelCard(architecture=SMALL, input=InputSpec(size=64))
    path = make_checkpoint(tmp_path / "m.safetensors", card, seed=1)
    sibling = export_onnx(path)
    assert Classifier.load(path, backend="onnx", cache_dir=tmp_path / "cache").backend.path == sibling
    make_checkpoint(path, card, seed=2)  # retrained: the sibling is now stale
    clf = Classifier.load(path, backend="onnx", cache_dir=tmp_path / "cache")
    assert clf.backend.path.parent == tmp_path / "cache" and clf.backend.path != sibling
    assert clf.backend.metadata["osteogate.checkpoint_sha256"] == clf.sha256
    torch_probs = Classifier.load(path, backend="torch", device="cpu").predict(images()[:1], ["knee"])
    onnx_probs = clf.predict(images()[:1], ["knee"])
    np.testing.assert_allclose(list(onnx_probs[0].probabilities.values()),
                               list(torch_probs[0].probabilities.values()), atol=1e-4)


def test_onnx_backend_does_not_import_torch(small):
    code = (
        "import sys; import numpy as np; from osteogate.model.inference import Classifier\n"
        f"clf = Classifier.load({str(small)!r}, backend='auto', device='cpu')\n"
        "p = clf.predict([np.random.default_rng(0).random((120, 90), dtype=np.float32)], ['spine'])\n"
        "assert clf.backend_name == 'onnxruntime-cpu', clf.backend_name\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(p[0].label)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("normal", "osteopenia", "osteoporosis")


def test_bad_arguments(small):
    with pytest.raises(ValueError, match="backend"):
        Classifier.load(small, backend="tensorrt")
    with pytest.raises(ValueError, match="device"):
        Classifier.load(small, backend="torch", device="tpu")


def test_auto_backend_without_gpu_is_onnx(small):
    from osteogate.model.inference import cuda_present

    if cuda_present():
        pytest.skip("GPU machine: auto picks torch-cuda")
    assert Classifier.load(small).backend_name == "onnxruntime-cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_agrees_with_onnx(small):
    gpu = Classifier.load(small, backend="torch", device="cuda")
    assert gpu.backend_name == "torch-cuda"
    cpu = Classifier.load(small, backend="onnx")
    for a, b in zip(gpu.predict(images(), ["knee", "spine", "knee"]), cpu.predict(images(), ["knee", "spine", "knee"]),
                    strict=True):
        # fp16 autocast: agreement to ~1e-2 in probability, not 1e-4.
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=2e-2)


def test_decide_label_uses_operating_thresholds() -> None:
    from osteogate.model.inference import decide_label

    probs = {"normal": 0.5, "osteopenia": 0.3, "osteoporosis": 0.2}
    assert decide_label(probs, {}) == "normal"  # no thresholds: most probable class
    assert decide_label(probs, {"low_bmd": 0.4}) == "osteopenia"  # 0.5 >= 0.4 flags low BMD
    assert decide_label(probs, {"low_bmd": 0.4, "osteoporosis": 0.15}) == "osteoporosis"
    assert decide_label(probs, {"low_bmd": 0.6, "osteoporosis": 0.25}) == "normal"
