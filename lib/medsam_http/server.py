"""Start and stop a real `monailabel start_server --app apps/medsam` on a free loopback port; the one
place that builds that command line (`serve_command`: tests, benchmarks, `main.py serve`)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Iterable

import requests

from .process import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "apps" / "medsam"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_command(studies: str, host: str, port: int, conf: Iterable[tuple[str, str]] = ()) -> list[str]:
    """`monailabel start_server` with the medsam app on `studies` (a folder or a DICOMweb URL)."""
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
               "--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in conf:
        command += ["--conf", key, str(value)]
    return command


class LabelServer(ServiceProcess):
    """A MONAI Label server process running the MedSAM app, its output kept in `log_path`.

    Use as a context manager, or call `start()` and `stop()`.
    """

    name = "MONAI Label server"

    def __init__(self, studies: str | os.PathLike, log_path: str | os.PathLike, conf: dict[str, str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None, env: dict[str, str] | None = None) -> None:
        super().__init__(log_path)
        self.studies = str(studies)  # a datastore folder or a DICOMweb URL (http://.../dicom-web)
        self.conf = conf or {}
        self.env = env or {}  # extra environment, e.g. MONAI Label settings such as MONAI_LABEL_SESSION_PATH
        self.host = host
        self.port = port or free_port(host)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return serve_command(self.studies, self.host, self.port, self.conf.items())

    def start(self, timeout: float = 300.0) -> "LabelServer":
        """Start the server and wait until GET /info/ answers; on failure raise with the log's tail."""
        self.launch(self.command(), lambda: requests.get(f"{self.url}/info/", timeout=5).status_code == 200,
                    timeout, poll=1.0, cwd=ROOT, env={**os.environ, **self.env})
        return self
