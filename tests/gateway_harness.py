"""Run `osteogate serve` as a real subprocess for end-to-end tests (so it can be SIGKILLed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import free_port, port_open, wait_until

REPO = Path(__file__).resolve().parent.parent


class GatewayProcess:
    def __init__(
        self,
        data_dir: Path,
        *,
        model: Path,
        destinations: list[str] = (),  # type: ignore[assignment]
        stable_seconds: float = 1,
        database_url: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ae_title: str = "OSTEOGATE",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.model = model
        self.destinations = list(destinations)
        self.stable_seconds = stable_seconds
        self.database_url = database_url
        self.extra_env = env or {}
        self.log_path = self.data_dir.parent / f"gateway-{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "osteogate.gateway.operate.cli", "serve", "--data-dir", str(self.data_dir),
               "--port", str(self.port), "--bind", "127.0.0.1", "--aet", self.ae_title,
               "--stable-seconds", str(self.stable_seconds), "--model", str(self.model)]
        for destination in self.destinations:
            cmd += ["--destination", destination]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        return cmd

    def start(self, timeout: float = 120) -> GatewayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
        env.update({
            "OSTEOGATE_LOGGING_FORMAT": "json",
            "OSTEOGATE_STUDY_CHECK_INTERVAL_SECONDS": "0.3",
            "OSTEOGATE_WORKER_POLL_INTERVAL_SECONDS": "0.3",
            "OSTEOGATE_DELIVERY_CHECK_INTERVAL_SECONDS": "0.5",
            "OSTEOGATE_DELIVERY_RETRY_BASE_SECONDS": "0.5",
            "OSTEOGATE_DELIVERY_RETRY_MAX_SECONDS": "2",
            "OSTEOGATE_STORAGE_MIN_FREE_MB": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return port_open("127.0.0.1", self.port)

        wait_until(ready, timeout, interval=0.2)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a power cut or OOM kill."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run another osteogate command against the same store."""
        cmd = [sys.executable, "-m", "osteogate.gateway.operate.cli", *args, "--data-dir", str(self.data_dir)]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stderr}\n{result.stdout}")
        return result

    def studies(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("studies", "--json").stdout)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
