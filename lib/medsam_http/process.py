"""A server process started in its own session, its output in a log file, waited on until ready."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import requests


class ServiceProcess:
    """Base of the servers the project starts (MONAI Label, Orthanc); a context manager."""

    name = "server"
    error: type[Exception] = RuntimeError

    def __init__(self, log_path: str | os.PathLike) -> None:
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        raise NotImplementedError

    def launch(self, command: list[str], ready: Callable[[], bool], timeout: float, poll: float = 0.5,
               **popen: object) -> None:
        """Run `command` and wait until `ready()` is true; raise `error` with the log's tail if it
        exits first or `timeout` seconds pass."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            **popen)  # type: ignore[call-overload]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.error(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(poll)
        self.stop()
        raise self.error(f"{self.name} did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 30 s."""
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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
