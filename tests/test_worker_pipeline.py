"""Decode/inference overlap in the worker (gateway/work/prefetch.py) and the worker's bounded memory per study."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from osteogate.gateway.work.prefetch import GPU_INPUTS_PER_CALL, Prefetcher, images_per_call, model_threads

REPO = Path(__file__).resolve().parents[1]


def test_results_in_order_and_complete():
    assert list(Prefetcher(lambda x: x * x).map(range(20))) == [(i, i * i) for i in range(20)]
    assert list(Prefetcher(lambda x: x).map([])) == []


def test_next_item_is_decoded_while_the_current_one_is_used():
    """While the consumer holds item 0, the background thread already works on item 1 (if it did
    not, waiting for that event would time out)."""
    started = [threading.Event() for _ in range(3)]

    def work(i: int) -> int:
        started[i].set()
        return i

    for i, _ in Prefetcher(work, depth=1).map(range(3)):
        if i < 2:
            assert started[i + 1].wait(5), f"item {i + 1} was not prefetched while item {i} was in use"


@pytest.mark.parametrize("depth", [1, 2])
def test_bounded_lookahead(depth):
    """Items made but not yet done with: at most depth + 2 (the one the consumer holds, depth
    queued, one in the making)."""
    produced, consumed, ahead = [0], [0], []

    def work(i: int) -> int:
        produced[0] += 1
        ahead.append(produced[0] - consumed[0])
        return i

    for _ in Prefetcher(work, depth=depth).map(range(12)):
        time.sleep(0.01)  # a slow consumer: the producer would run away if unbounded
        consumed[0] += 1
    assert max(ahead) <= depth + 2


def test_work_exception_raised_at_its_item():
    def work(i: int) -> int:
        if i == 3:
            raise ValueError("bad image 3")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad image 3"):
        for i, _ in Prefetcher(work).map(range(10)):
            seen.append(i)
    assert seen == [0, 1, 2]


def test_leaving_early_stops_the_thread():
    before = {t.ident for t in threading.enumerate()}
    stream = Prefetcher(lambda i: i, depth=1, name="test-prefetch").map(range(1000))
    for i, _ in stream:
        if i == 2:
            break
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("test-prefetch") and t.ident not in before]


def test_images_per_call_by_backend():
    assert images_per_call("onnxruntime-cpu", 8, 8) == 1  # patches mode: one image per ORT batch of 8
    assert images_per_call("onnxruntime-cpu", 1, 8) == 8  # whole mode: 8 images per batch
    assert images_per_call("torch-cpu", 16, 8) == 1  # never zero
    assert images_per_call("torch-cuda", 8, 8) == GPU_INPUTS_PER_CALL // 8


def test_model_threads_one_per_core_unless_set():
    assert model_threads(0, cores=2) == 2
    assert model_threads(0, cores=16) == 16
    assert model_threads(0, cores=1) == 1
    assert model_threads(3, cores=16) == 3  # model.threads set: used as is
    assert model_threads(0) >= 1


def test_the_workers_onnx_session_does_not_spin_wait(tmp_path, tiny_model):
    """The decoders share the cores with ONNX Runtime; its idle threads must sleep, not spin."""
    from osteogate.gateway.core.config import Settings
    from osteogate.gateway.operate.preflight import ClassifierCache

    settings = Settings(storage={"data_dir": str(tmp_path)}, model={"path": str(tiny_model), "backend": "onnx"})
    session = ClassifierCache(settings)().backend.session
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == model_threads(0)


# -- the worker itself: a study of many large images, peak RSS from /proc ----------------------------

_STUDY_SCRIPT = r"""
import json, sys, io
from datetime import timedelta
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
from osteogate.gateway.core.config import Settings
from osteogate.gateway.store.db import Database, Instance
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.worker import ClassifierWorker
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.model.inference import Classifier
from pydicom.uid import generate_uid
from tests.helpers import make_dataset

work, model, count, size = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

db = Database(f"sqlite:///{work / 'gw.db'}")
db.create_schema()
spool = Spool(work / "spool")
ingestor = Ingestor(db, spool)
study = generate_uid()
base = make_dataset(study_uid=study, size=(size, size), seed=7)
for _ in range(count):  # same pixels, new UIDs: what matters here is the number of large images
    base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    base.save_as(buffer, enforce_file_format=True)
    ingestor.store(buffer.getvalue())
del base, buffer
with db.session() as session:
    instances = session.query(Instance).all()
classifier = Classifier.load(model, backend="onnx")
worker = ClassifierWorker(Settings(), db, spool, ReportPublisher(Settings(), Spool(work / "reports")), lambda _: classifier)
worker.classify(instances[:1], classifier)  # warm-up: libraries, model, allocator pools
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
before = kib("VmRSS")
outcome = worker.classify(instances, classifier)
print(json.dumps({"classified": len(outcome.scored), "rss_kib": before, "peak_kib": kib("VmHWM")}))
"""


def _study_peak(tmp_path: Path, model: Path, count: int, size: int) -> dict:
    work = tmp_path / f"n{count}"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", _STUDY_SCRIPT, str(REPO), str(work), str(model), str(count), str(size)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["classified"] == count
    return result


def test_worker_peak_memory_does_not_grow_with_study_size(tmp_path, tiny_model):
    """Issue #9 (worker's peak memory per study bounded): a study of 24 images of 2048x2048 costs
    no more peak memory than one of 4 (measured here: +21 MiB for 3, +47 MiB for 16 and +48 MiB
    for 40 images: flat once the pipeline is full). The previous loop kept every decoded full-size
    float32 image: 20 more images cost 20 x 16.8 MB = 336 MB more (measured: +74 MiB for 3, +305 MiB
    for 16)."""
    small = _study_peak(tmp_path, tiny_model, 4, 2048)
    large = _study_peak(tmp_path, tiny_model, 24, 2048)
    growth_small = (small["peak_kib"] - small["rss_kib"]) / 1024
    growth_large = (large["peak_kib"] - large["rss_kib"]) / 1024
    print(f"peak above steady RSS: 4 images {growth_small:.0f} MiB, 24 images {growth_large:.0f} MiB")
    assert growth_large - growth_small < 40, (small, large)
    assert growth_large < 150, large
