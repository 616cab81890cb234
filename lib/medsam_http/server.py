"""Start and stop a real `monailabel start_server --app apps/medsam` on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "apps" / "medsam"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LabelServer:
    """A MONAI Label server process running the MedSAM app, its output kept in `log_path`.

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, studies: str | os.PathLike, log_path: str | os.PathLike, conf: dict[str, str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.studies = str(studies)  # a datastore folder or a DICOMweb URL (http://.../dicom-web)
        self.log_path = Path(log_path)
        self.conf = conf or {}
        self.env = env or {}  # extra environment, e.g. MONAI Label settings such as MONAI_LABEL_SESSION_PATH
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
                   "--studies", self.studies, "--host", self.host, "--port", str(self.port)]
        for key, value in self.conf.items():
            command += ["--conf", key, str(value)]
        return command

    def start(self, timeout: float = 300.0) -> "LabelServer":
        """Start the server and wait until GET /info/ answers; on failure raise with the log's tail."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"MONAI Label server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"MONAI Label server did not answer /info/ within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 30 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 150) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "LabelServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
