"""dcmtk command-line tools as test doubles: storescp as a tiny PACS, storescu/echoscu as SCUs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom

from .net import free_port, port_open, wait_until

# storescu proposes uncompressed transfer syntaxes only, unless told otherwise; a compressed file
# is then decompressed by dcmtk (if it has a codec) or fails to send (JPEG 2000: no codec).
# To send files *untranscoded* we run one storescu per transfer syntax with the flag that
# proposes exactly that syntax. None = storescu's default proposal (explicit/implicit LE).
STORESCU_TS_FLAGS: dict[str, str | None] = {
    "1.2.840.10008.1.2": "-xi",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": None,  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": "-xb",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
}


def dcmtk_available(*tools: str) -> bool:
    return all(shutil.which(tool) for tool in tools or ("storescp", "storescu", "echoscu"))


def _transfer_syntax(path: Path) -> str:
    """The file's transfer syntax, or "" when unreadable: tests deliberately send broken files,
    and storescu (not this wrapper) should be the one to report on them."""
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        return str(meta.TransferSyntaxUID)
    except Exception:
        return ""


def storescu(
    files: Iterable[Path | str],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "MODALITY",
    extra_args: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send `files` with dcmtk storescu, each in its own transfer syntax (no transcoding).

    Files are grouped by transfer syntax and each group goes out in one association proposing
    that syntax (see STORESCU_TS_FLAGS); unknown syntaxes fall back to storescu's default and
    are decompressed by dcmtk if it can. The result merges the runs: `returncode` is the first
    non-zero one (0 when all succeeded), stdout/stderr are concatenated, `args` lists the
    commands. Order inside a group is kept; groups go in order of first appearance.
    """
    groups: dict[str | None, list[str]] = {}
    for f in files:
        ts = _transfer_syntax(Path(f))
        groups.setdefault(STORESCU_TS_FLAGS.get(ts), []).append(str(f))
    if not groups:
        raise ValueError("storescu: no files to send")
    commands: list[list[str]] = []
    returncode, out, err = 0, [], []
    for flag, paths in groups.items():
        # -to/-ta bound connect and association waits so a dead PACS fails fast instead of
        # hanging the test until the subprocess timeout.
        # -R: propose only the SOP classes of the files being sent. Without it storescu proposes
        # its fixed default list, which (128 context limit) lacks e.g. Comprehensive 3D SR.
        cmd = ["storescu", "-R", "-to", "10", "-ta", "10", "-aet", calling_aet, "-aec", called_aet]
        if flag:
            cmd.append(flag)
        cmd += [*extra_args, host, str(port), *paths]
        commands.append(cmd)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        out.append(proc.stdout)
        err.append(proc.stderr)
        if proc.returncode and not returncode:
            returncode = proc.returncode
    return subprocess.CompletedProcess(commands, returncode, "".join(out), "".join(err))


def echoscu(
    host: str, port: int, aet: str, calling_aet: str = "ECHOSCU", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk echoscu; returncode 0 means the peer answered."""
    cmd = ["echoscu", "-to", "5", "-ta", "5", "-aet", calling_aet, "-aec", aet, host, str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


class StoreSCP:
    """dcmtk storescp as a minimal PACS: accepts every storage SOP class (SR included) in any
    transfer syntax it knows, and writes each instance as ``<MODALITY>.<SOPInstanceUID>.dcm``
    into `dir` without transcoding.

    `stop()`/`start()` keep the same port so tests can simulate a PACS that is down for a while.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        ae_title: str = "PACS",
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.options = list(options)  # further storescp options, e.g. ["--fork"]
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.host = host
        # The log lives beside (not inside) the output directory so globbing `dir` only ever
        # sees received instances.
        self.log_path = log_path or self.dir.parent / f"storescp-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15) -> StoreSCP:
        if self.running:
            return self
        cmd = [
            "storescp",
            "-v",
            "-aet", self.ae_title,
            "+xa",  # accept all supported transfer syntaxes (JPEG 2000, JPEG-LS, RLE, ...)
            "-pm",  # promiscuous: also accept storage SOP classes dcmtk does not list
            "-od", str(self.dir),
            "-fe", ".dcm",
            "-dhl",  # no reverse DNS lookups: they can stall on sandboxed CI machines
            *self.options,
            str(self.port),
        ]  # fmt: skip
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()  # the child holds its own descriptor
        try:
            wait_until(lambda: self._ready(), timeout, interval=0.05)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"storescp did not start on port {self.port}: {self.log()}") from None
        return self

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {self._proc.returncode}: {self.log()}")
        # A bare TCP connect is enough: storescp logs a failed association and keeps serving.
        return port_open(self.host, self.port)

    def stop(self, timeout: float = 10) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        # Make sure the listening socket is gone before a restart binds the same port again.
        wait_until(lambda: not port_open(self.host, self.port), timeout)

    def files(self, pattern: str = "*") -> list[Path]:
        return sorted(p for p in self.dir.glob(pattern) if p.is_file())

    def wait_for_files(self, pattern: str = "*", count: int = 1, timeout: float = 30) -> list[Path]:
        """Wait until at least `count` files matching `pattern` are completely written.

        A file counts once its size is non-zero and unchanged across two polls; storescp writes
        in place, so a file that is still growing must not be handed to a test yet.
        """
        sizes: dict[Path, int] = {}

        def settled() -> list[Path] | None:
            done = []
            for path in self.files(pattern):
                size = path.stat().st_size
                if size and sizes.get(path) == size:
                    done.append(path)
                sizes[path] = size
            return done if len(done) >= count else None

        try:
            return wait_until(settled, timeout, interval=0.1)
        except TimeoutError:
            raise TimeoutError(
                f"expected {count} file(s) matching {pattern!r} in {self.dir}, "
                f"have {[p.name for p in self.files(pattern)]}; storescp log:\n{self.log()}"
            ) from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"StoreSCP({self.ae_title}@{self.host}:{self.port}, dir={self.dir})"
