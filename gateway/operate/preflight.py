"""Before the gateway starts: the model file resolved and its card checked (taxonomy), ports
free, TLS files present, unsafe defaults said once; and the cache of loaded classifiers. Each
problem is a line an operator can act on, found before the model loads."""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
import threading
from importlib.resources import files
from pathlib import Path
from typing import Any

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.errors import ConfigurationError, TemporaryFailure
from osteogate.gateway.core.logs import get_logger

log = get_logger("osteogate.gateway.operate.preflight")

# Package data (importlib.resources), so a wheel or container install finds it as well as a checkout.
SHIPPED_MODEL = Path(str(files("osteogate.model") / "shipped" / "osteogate-knee.safetensors"))


def torch_installed() -> bool:
    """Whether torch can be imported, without importing it (serving on CPU never does)."""
    return importlib.util.find_spec("torch") is not None


def resolve_model_path(settings: Settings, *, create_untrained: bool = True) -> Path | None:
    """The configured checkpoint, else the shipped one, else an untrained one made once (loudly).

    With ``create_untrained=False`` (checks only) the untrained case answers None.
    """
    if settings.model.path:
        path = Path(settings.model.path)
        if not path.is_file():
            raise ConfigurationError(f"model file {path} does not exist",
                                     f"model.path from {settings.source_of('model.path')}",
                                     "Fix model.path (or --model), or leave it empty to serve the shipped model")
        return path
    if SHIPPED_MODEL.is_file():
        return SHIPPED_MODEL
    if not torch_installed():
        raise ConfigurationError("no model to serve",
                                 "model.path is empty, this install ships no checkpoint, and making an untrained "
                                 "one needs torch, which is not installed",
                                 "Set model.path, or install the training extra: pip install 'osteogate[train]'")
    untrained = settings.storage.data_dir / "models" / "untrained-efficientnet_b0.safetensors"
    if not create_untrained:
        return None
    if not untrained.is_file():
        from osteogate.model.network import create_untrained_checkpoint

        untrained.parent.mkdir(parents=True, exist_ok=True)
        create_untrained_checkpoint(untrained)
    log.warning("model_untrained", path=str(untrained),
                message="NO TRAINED MODEL: results are random; the SR algorithm name says UNTRAINED")
    return untrained


def check_model_card(path: Path) -> Any:
    """The card of ``path``, refused (TaxonomyError) unless its classes and regions are the ones
    this gateway reports (model.taxonomy): a mismatching card must fail at start, not in every job."""
    from osteogate.model.checkpoint import read_card
    from osteogate.model.taxonomy import check_card_taxonomy

    card = read_card(path)
    check_card_taxonomy(card.classes, card.regions, what=f"the model card of {path}")
    return card


def check_ports(settings: Settings) -> None:
    """Bind (and release) each port ``serve`` will listen on (DICOM, and HTTP when enabled) before
    the model loads: a taken port must stop the start in a second, not after the model loaded."""
    listeners = [(settings.dicom.bind, settings.dicom.port, "dicom.port", "--port")]
    if settings.http.enabled:
        listeners.append((settings.http.bind, settings.http.port, "http.port", "OSTEOGATE_HTTP_PORT"))
    if settings.groundtruth.mllp_enabled:
        listeners.append((settings.groundtruth.bind, settings.groundtruth.mllp_port, "groundtruth.mllp_port",
                          "OSTEOGATE_GROUNDTRUTH_MLLP_PORT"))
    for host, port, key, flag in listeners:
        if port == 0:
            continue  # any free port: cannot be taken
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the real listeners do (pynetdicom, wsgiref): a port in TIME_WAIT is free, one with
            # a listener is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(1)
            except socket.gaierror as exc:
                raise ConfigurationError(f"cannot listen on {host}:{port}", f"unknown address ({exc.strerror})",
                                         f"Fix {key.split('.')[0]}.bind") from None
            except OSError as exc:
                source = settings.source_of(key)
                if exc.errno == errno.EADDRINUSE:
                    raise TemporaryFailure(
                        f"cannot listen on {host}:{port}",
                        "address already in use (another osteogate or DICOM server is running there)",
                        f"Stop it, or choose another port with {flag} or {key} (now from {source})") from None
                if exc.errno == errno.EACCES:
                    raise ConfigurationError(
                        f"cannot listen on {host}:{port}", "permission denied (ports below 1024 need "
                        "CAP_NET_BIND_SERVICE)", f"Use a port above 1023 or grant the capability ({key})") from None
                raise ConfigurationError(f"cannot listen on {host}:{port}", exc.strerror or str(exc),
                                         f"Fix {key} and {key.split('.')[0]}.bind") from None


def preflight_problems(settings: Settings, *, thorough: bool = True) -> list[str]:
    """What would stop ``serve`` after the configuration itself parsed: files that must exist and
    be usable (model, TLS certificates) and a data directory that can be created.

    ``osteogate config check`` runs it thoroughly (an ONNX model that cannot be had without torch
    counts); ``serve`` runs it before the model loads and lets the model load check the rest.
    """
    problems: list[str] = []
    if settings.worker.enabled:
        problems.extend(_model_problems(settings, thorough))
    problems.extend(_tls_problems(settings))
    data_dir = settings.storage.data_dir.resolve()
    existing = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        problems.append(f"storage.data_dir: {data_dir} cannot be created or written ({existing} is not writable)")
    return problems


def _model_problems(settings: Settings, thorough: bool) -> list[str]:
    from osteogate.gateway.core.errors import translate

    key = "model.path" if settings.model.path else "model (shipped checkpoint)"
    try:
        path = resolve_model_path(settings, create_untrained=False)
        if path is None:
            return []  # an untrained model will be made (torch is there): loud at start, not an error
        check_model_card(path)
    except Exception as exc:
        known = translate(exc)
        if known is None:
            raise
        return [f"{key}: {known.line()}"]
    cfg = settings.model
    needs_torch = cfg.backend == "torch" or cfg.device.startswith("cuda")
    if needs_torch and not torch_installed():
        return [f"model.backend: {cfg.backend} on {cfg.device} needs torch, which is not installed "
                "(install osteogate[gpu], or use backend = \"onnx\")"]
    if thorough and not needs_torch and not torch_installed():
        from osteogate.model.checkpoint import checkpoint_sha256
        from osteogate.model.inference import ModelUnavailable, open_onnx

        try:
            open_onnx(path, checkpoint_sha256(path), settings.storage.data_dir / "models" / "onnx", 1)
        except ModelUnavailable as exc:
            return [f"{key}: {exc}"]
    return []


def _tls_problems(settings: Settings) -> list[str]:
    from osteogate.gateway.core.dicomnet import client_tls_context, server_tls_context

    problems = []
    if settings.dicom.tls.enabled:
        try:
            server_tls_context(settings.dicom.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            problems.append(f"dicom.tls: the certificate or key cannot be used: {exc}")
    if settings.groundtruth.tls_cert:
        from osteogate.gateway.groundtruth.mllp import tls_context

        try:
            tls_context(settings.groundtruth)
        except (OSError, ValueError) as exc:
            problems.append(f"groundtruth.tls_cert: the certificate or key cannot be used: {exc}")
    if any(d.tls for d in settings.delivery.destinations):
        try:
            client_tls_context(settings.delivery.tls)
        except (OSError, ValueError) as exc:
            problems.append(f"delivery.tls: the CA or client certificate cannot be used: {exc}")
    return problems


def preflight(settings: Settings, *, listeners: bool = True) -> None:
    """Everything checked before a long-running process loads its model: serve (``listeners``:
    its ports too) and worker (no listener)."""
    if listeners:
        check_ports(settings)
    problems = preflight_problems(settings, thorough=False)
    if problems:
        raise ConfigurationError("cannot start", "; ".join(problems),
                                 "`osteogate config check FILE` lists every problem")


def warn_unsafe_defaults(settings: Settings, *, listener: bool = True, port: int | None = None) -> None:
    """Loud warnings for what a first start leaves open: no destination, any caller accepted.
    ``port``: the port really bound (dicom.port may be 0, "any free port")."""
    if not settings.delivery.destinations:
        log.warning("no_destination", reports=str(settings.storage.reports_dir),
                    message="NO DESTINATION CONFIGURED: SRs are made and kept under the reports directory but "
                            "sent nowhere; set delivery.destinations (or --to AET@HOST:PORT)")
    dicom = settings.dicom
    if listener and not dicom.allowed_calling_aets and not dicom.allowed_hosts:
        port = port or dicom.port
        log.warning("any_caller_accepted", bind=dicom.bind, port=port,
                    message="ANY CALLER IS ACCEPTED: dicom.allowed_calling_aets and dicom.allowed_hosts are empty; "
                            f"whoever reaches {dicom.bind}:{port} and knows the AE title can store images")


class ClassifierCache:
    """Loads checkpoints once; replay jobs may name another checkpoint than the served one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._default = resolve_model_path(settings)
        self._loaded: dict[Path, Any] = {}
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._default in self._loaded

    def __call__(self, path: str | None = None) -> Any:
        from osteogate.gateway.work.prefetch import model_threads
        from osteogate.model.inference import Classifier

        target = Path(path) if path else self._default
        with self._lock:
            if target not in self._loaded:
                check_model_card(target)  # before any ONNX export or weight loading
                cfg = self.settings.model
                self._loaded[target] = Classifier.load(
                    target, backend=cfg.backend, device=cfg.device,
                    cache_dir=self.settings.storage.data_dir / "models" / "onnx",
                    intra_op_threads=model_threads(cfg.threads),
                    spin_wait=False,  # decoders share the cores (gateway/work/prefetch.py model_threads)
                )
                classifier = self._loaded[target]
                log.info("model_loaded", model=classifier.card.display_name, backend=classifier.backend_name,
                         sha256=classifier.sha256[:12], trained=not classifier.untrained)
            return self._loaded[target]
