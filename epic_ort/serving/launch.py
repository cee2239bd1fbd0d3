"""Start `epic-ort serve` in a child process and wait until it serves: for tests, benchmarks and
scripts that need a real server on the loopback.

    with ServerProcess("models/smollm2-135m", "--max-running", "16") as server:
        requests.post(server.url + "/v1/completions", ...)

Leaving the block sends SIGTERM (the server's graceful shutdown) and waits for the process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server child process; `url`, `pid`, `health()`, `stop()`."""

    def __init__(self, model_dir: str | os.PathLike, *args: str, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 180.0, env: dict[str, str] | None = None):
        self.host, self.port = host, port or free_port(host)
        self.args = [sys.executable, "-m", "epic_ort.cli.main", "serve", str(model_dir), "--host", host,
                     "--port", str(self.port), "--log-level", "warning", *args]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.output()}")
            status, _ = self.health()
            if status == 200:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not become ready in {self.startup_timeout:.0f} s:\n{self.output()}")

    def health(self) -> tuple[int, dict[str, Any] | None]:
        """(status, body) of GET /health; (0, None) while nothing listens."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except (OSError, ValueError):
            return 0, None

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-4000:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait (SIGKILL after `timeout`); the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()
