"""Shared pieces of the benchmarks: repo on sys.path, the model to use, process memory from /proc."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHIPPED_MODEL = ROOT / "model" / "shipped" / "osteogate-knee.safetensors"


def resolve_model(requested: Path | None, work: Path, architecture: str = "efficientnet_b0") -> Path:
    """The requested checkpoint, else the shipped one, else an untrained one made in `work`.

    The ONNX sibling is exported here, in the benchmark process, so the gateway under test never
    pays for (or imports torch for) an export while it is being measured.
    """
    if requested is not None:
        if not requested.is_file():
            raise SystemExit(f"model {requested} does not exist")
        path = requested
    elif SHIPPED_MODEL.is_file():
        path = SHIPPED_MODEL
    else:
        from osteogate.model.network import create_untrained_checkpoint

        path = work / f"untrained-{architecture}.safetensors"
        create_untrained_checkpoint(path, architecture=architecture)
        print(f"(no shipped model: using an untrained {architecture} checkpoint; speed is the same)")
    if not path.with_suffix(".onnx").is_file():
        from osteogate.model.export import export_onnx

        export_onnx(path)
    return path


def proc_status_kib(pid: int, field: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style field of /proc/PID/status in KiB (None if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def maps_libraries(pid: int, needle: str) -> list[str]:
    """Shared objects mapped into the process whose path contains `needle` (e.g. libtorch)."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError:
        return []
    return sorted({line.split()[-1] for line in text.splitlines() if needle in line and "/" in line})


def mb(n_bytes: float) -> float:
    return n_bytes / 1e6


@contextmanager
def todays_decoders() -> Iterator[None]:
    """The decoder plugins as pydicom chooses them (the path before issue #11): "before" figures."""
    from osteogate.model import pixels

    saved = dict(pixels.PREFERRED_PLUGINS)
    pixels.PREFERRED_PLUGINS.clear()
    try:
        yield
    finally:
        pixels.PREFERRED_PLUGINS.update(saved)
