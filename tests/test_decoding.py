"""Decoders: which studies get decoder processes, that a process decodes exactly what a thread does,
that a decoder killed by an image costs that image only, and the memory the decoders take."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.gateway.core.config import Settings
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.store.db import Database, Instance
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.decoding import (
    DECODER_DIED,
    DecodeRequest,
    DecoderPool,
    _decode_in_process,
    decode_for_model,
)
from osteogate.gateway.work.prefetch import SLOW_DECODE_SYNTAXES, decode_plan
from osteogate.gateway.work.worker import ClassifierWorker
from osteogate.model.card import InputSpec
from osteogate.model.inference import Classifier
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, generate_uid

from tests.helpers import sample_file
from tests.helpers.codecs import encode, enlarged_sample

SPEC = InputSpec(mode="patches", size=224, patch_size=128, patches_per_image=8, working_size=1024, channels=1,
                 mean=(0.5,), std=(0.25,))
CRASH_MARK = "decoder-killer"


def _crash_on_mark(request: DecodeRequest) -> object:
    """A decoder that dies (as a segfault or an out-of-memory kill would) on files named so."""
    if CRASH_MARK in request.path:
        os._exit(70)
    return _decode_in_process(request)


def _die_at_start(*_: object) -> None:
    """A decoder process that cannot start (as when an embedding main script fails in a child)."""
    os._exit(71)


def _own_pid(_: object) -> int:
    return os.getpid()


_KILLED_PARENT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from osteogate.gateway.work.decoding import DecoderPool
from tests.test_decoding import _own_pid
if __name__ == "__main__":
    pool = DecoderPool(2, work=_own_pid)
    print(pool.decode(None), flush=True)
    time.sleep(300)
"""


def _request(path: Path, long_side: int = 1024) -> DecodeRequest:
    return DecodeRequest(str(path), long_side, SPEC, ("knee", "spine"), thumbnail=True)


# -- which studies get decoder processes (pure) ------------------------------------------------------


def test_decode_plan_slow_codecs_get_parallel_decoder_processes():
    assert decode_plan([JPEG2000Lossless], 0, True, cores=2) == (2, True)
    assert decode_plan([RLELossless, JPEG2000Lossless], 0, True, cores=8) == (4, True)  # at most 4
    assert decode_plan([JPEG2000Lossless], 3, True, cores=2) == (3, True)  # model.decoders set
    assert decode_plan([JPEG2000Lossless], 0, False, cores=2) == (2, False)  # threads asked for
    # Fast codecs: the model bounds the study; one decode thread beside it.
    assert decode_plan(["1.2.840.10008.1.2.1", RLELossless, JPEGBaseline8Bit, None], 0, True, cores=2) == (1, False)
    assert decode_plan([], 0, True, cores=2) == (1, False)
    assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70"} <= SLOW_DECODE_SYNTAXES
    assert JPEGBaseline8Bit not in SLOW_DECODE_SYNTAXES


# -- a decoder process decodes what a thread decodes ------------------------------------------------


def test_process_decode_is_identical_to_thread_decode(tmp_path):
    path = encode(enlarged_sample("knee_dx", (1536, 1536), seed=3), "JPEG 2000 lossless", tmp_path)
    here = decode_for_model(_request(path))
    with DecoderPool(2) as pool:
        there = pool.decode(_request(path))
    assert here.skip_reason is None and there.skip_reason is None
    assert there.region == here.region == "knee"
    assert np.array_equal(there.prepared.inputs, here.prepared.inputs)
    assert there.prepared.boxes == here.prepared.boxes
    assert np.array_equal(there.thumbnail, here.thumbnail)
    assert there.header.SOPInstanceUID == here.header.SOPInstanceUID and "PixelData" not in there.header
    assert there.decoder_peak_kib and there.decoder_peak_kib > 10_000 and here.decoder_peak_kib is None


def test_skip_reasons_come_back_from_the_process(tmp_path):
    chest = sample_file("chest_dx")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all" * 10)
    with DecoderPool(1) as pool:
        assert pool.decode(_request(chest)).skip_reason.startswith("region ")
        assert pool.decode(_request(garbage)).skip_reason.startswith("spooled file unreadable")


# -- a decoder that dies costs its image only -------------------------------------------------------


def test_a_decoder_killed_by_one_image_costs_that_image_only(tmp_path):
    good = [tmp_path / f"good{n}.dcm" for n in range(3)]
    for path in good:
        shutil.copyfile(sample_file("knee_j2k"), path)
    killer = tmp_path / f"{CRASH_MARK}.dcm"
    shutil.copyfile(sample_file("knee_j2k"), killer)
    results: dict[str, object] = {}

    def decode(pool: DecoderPool, path: Path) -> None:
        results[path.name] = pool.decode(_request(path))

    with DecoderPool(2, work=_crash_on_mark) as pool:
        # Two decode threads, as in the worker: the killer breaks the pool while others are in flight.
        threads = [threading.Thread(target=decode, args=(pool, p)) for p in (good[0], killer, good[1])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        decode(pool, good[2])  # and the pool works again afterwards
    dead = results[killer.name]
    assert dead.skip_reason == DECODER_DIED and dead.prepared is None
    assert dead.header.SOPInstanceUID == pydicom.dcmread(killer, stop_before_pixels=True).SOPInstanceUID
    for path in good:
        assert results[path.name].skip_reason is None and results[path.name].prepared is not None, path


def test_without_decoder_processes_images_are_decoded_in_the_thread(tmp_path, monkeypatch, capsys):
    """Decoder processes that die at start, or cannot be made at all (no usable /dev/shm): every
    image is still decoded, in the calling thread, and the operator is told once."""
    import osteogate.gateway.work.decoding as decoding

    path = tmp_path / "knee.dcm"
    shutil.copyfile(sample_file("knee_j2k"), path)
    expected = decode_for_model(_request(path))

    with DecoderPool(2, initializer=_die_at_start) as pool:
        first, second = pool.decode(_request(path)), pool.decode(_request(path))
    assert pool.unavailable == "decoder processes die at start"
    for decoded in (first, second):
        assert decoded.skip_reason is None and np.array_equal(decoded.prepared.inputs, expected.prepared.inputs)

    def no_semaphores() -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(decoding, "_process_context", no_semaphores)
    with DecoderPool(2) as pool:
        decoded = pool.decode(_request(path))
    assert pool.unavailable.startswith("OSError") and decoded.skip_reason is None
    assert np.array_equal(decoded.prepared.inputs, expected.prepared.inputs)
    said = capsys.readouterr()
    assert (said.out + said.err).count("decoder_processes_unavailable") == 2  # once per pool, not per image


def test_decoders_exit_when_the_gateway_is_killed(tmp_path):
    """SIGKILL or an OOM kill of the gateway: its decoder processes (and the fork server) go too,
    instead of waiting for work for ever, one pair more after every crash."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO_ROOT

    script = tmp_path / "gateway.py"
    script.write_text(_KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(REPO_ROOT)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        decoder = int(parent.stdout.readline())
        assert decoder != parent.pid and Path(f"/proc/{decoder}").exists()
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{decoder}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{decoder}").exists(), "the decoder outlived the gateway"


# -- the worker with decoder processes ----------------------------------------------------------------


@pytest.fixture()
def j2k_study(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.create_schema()
    spool = Spool(tmp_path / "spool")
    ingestor = Ingestor(db, spool)
    study = generate_uid()
    source = enlarged_sample("knee_dx", (2048, 2048), seed=5)
    source.StudyInstanceUID = study
    for n in range(6):
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        source.InstanceNumber = n + 1
        ingestor.store(encode(source, "JPEG 2000 lossless", tmp_path / f"enc{n}").read_bytes())
    with db.session() as session:
        instances = session.query(Instance).all()
    assert {i.transfer_syntax_uid for i in instances} == {JPEG2000Lossless}
    return db, spool, instances


def test_worker_scores_the_same_with_decoder_processes_and_threads(tmp_path, tiny_model, j2k_study):
    db, spool, instances = j2k_study
    classifier = Classifier.load(tiny_model, backend="onnx")
    outcomes = {}
    for in_subprocess in (True, False):
        settings = Settings(model={"decode_in_subprocess": in_subprocess, "decoders": 2})
        worker = ClassifierWorker(settings, db, spool, ReportPublisher(settings, Spool(tmp_path / "reports")), lambda _: classifier)
        try:
            outcomes[in_subprocess] = worker.classify(instances, classifier)
            if in_subprocess:  # the decoder processes are kept for the next slow-codec study
                pool = worker.pipeline._decoders
                assert pool is not None and pool.processes == 2
                worker.classify(instances[:2], classifier)
                assert worker.pipeline._decoders is pool
        finally:
            worker.stop()
        assert worker.pipeline._decoders is None
    processes, threads = outcomes[True], outcomes[False]
    assert len(processes.scored) == len(threads.scored) == 6
    for a, b in zip(processes.images, threads.images, strict=True):
        assert a.instance.sop_instance_uid == b.instance.sop_instance_uid
        assert a.score.probabilities == b.score.probabilities
        assert np.array_equal(a.thumbnail, b.thumbnail)
    # Memory: each decoder process stays small (a reduced-resolution decode and the libraries).
    peaks = [i.decoder_peak_kib for i in processes.images]
    assert all(peaks) and max(peaks) < 400 * 1024, peaks
    assert all(i.decoder_peak_kib is None for i in threads.images)
