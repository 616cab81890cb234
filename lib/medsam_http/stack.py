"""The whole DICOMweb stack in one command: Orthanc with the sample series, and the medsam server
reading them through DICOMweb (`python main.py serve --orthanc`). Orthanc is installed by
scripts/setup.sh (apt-get), never by a serve command."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from medsam_http.dicom_samples import load_samples
from medsam_http.orthanc import OrthancServer
from medsam_http.server import ROOT, serve_command

DEFAULT_WORKDIR = ROOT / "out" / "orthanc"


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that `finally` stops Orthanc


def serve_with_orthanc(host: str, port: int, conf: dict[str, str], orthanc_port: int = 8042,
                       workdir: Path = DEFAULT_WORKDIR) -> int:
    """Start Orthanc (OrthancError when it is not installed), load the samples, run the server until
    it exits or is interrupted, then stop Orthanc. Orthanc's storage in `workdir` is kept: saved SEGs stay."""
    orthanc = OrthancServer(workdir, orthanc_port).start()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        series = load_samples(orthanc.dicomweb_url)
        print(f"Orthanc: {orthanc.url} (DICOMweb {orthanc.dicomweb_url}, storage {workdir}); "
              f"sample series: {series}", flush=True)
        command = serve_command(orthanc.dicomweb_url, host, port, conf.items())
        print(f"MedSAM server: http://{host}:{port}/  OHIF: http://{host}:{port}/ohif/", flush=True)
        return subprocess.call(command, cwd=ROOT)
    except KeyboardInterrupt:
        return 130
    finally:
        orthanc.stop()

