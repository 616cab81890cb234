"""A local Orthanc PACS with its DICOMweb plugin (Debian packages `orthanc`, `orthanc-dicomweb`).

Orthanc 1.10 has no option to choose its listening address: it listens on the HTTP port of every
interface, and the config written here makes it refuse every client that is not on this machine
(`RemoteAccessAllowed: false`) and turns its DICOM (DIMSE) server off. No authentication: only
local processes can reach it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import requests

from medsam_http.process import ServiceProcess
from medsam_http.server import free_port

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancError(RuntimeError):
    """Orthanc is missing, failed to start, or refused a request."""


def is_installed() -> bool:
    return ORTHANC_BINARY.exists() and DICOMWEB_PLUGIN.exists()


def install() -> None:
    """apt-get install orthanc and orthanc-dicomweb when missing (needs root and a Debian mirror)."""
    if is_installed():
        return
    if shutil.which("apt-get") is None:
        raise OrthancError("Orthanc is not installed and there is no apt-get: install orthanc and orthanc-dicomweb")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "orthanc", "orthanc-dicomweb"],
                   check=True, env=env)
    if not is_installed():
        raise OrthancError(f"apt-get installed Orthanc but {ORTHANC_BINARY} or {DICOMWEB_PLUGIN} is missing")


def write_config(workdir: Path, port: int) -> Path:
    """Orthanc's JSON config for a server storing under `workdir`, HTTP on `port`, DICOMweb on."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "MedSAM-Orthanc",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # only clients on this machine
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,  # DICOMweb only, no DIMSE port
        "HttpCompressionEnabled": False,
        "StableAge": 5,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Host": f"127.0.0.1:{port}", "Ssl": False},
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


class OrthancServer(ServiceProcess):
    """An Orthanc process on a loopback port with its storage in `workdir` (kept between runs)."""

    name = "Orthanc"
    error = OrthancError

    def __init__(self, workdir: str | os.PathLike, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        super().__init__(self.workdir / "orthanc.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> "OrthancServer":
        """Start Orthanc and wait until its REST API answers; raise with its log if it does not."""
        if not is_installed():
            raise OrthancError(f"Orthanc is not installed ({ORTHANC_BINARY}, {DICOMWEB_PLUGIN}): run `bash scripts/setup.sh` "
                               "as root (or apt-get install orthanc orthanc-dicomweb)")
        config = write_config(self.workdir, self.port)
        self.launch([str(ORTHANC_BINARY), str(config)], lambda: requests.get(f"{self.url}/system", timeout=2).ok,
                    timeout, poll=0.3)
        return self

