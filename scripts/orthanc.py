"""Orthanc (DICOMweb) for the MedSAM app: install it, run it with the sample series, or load them.

    python scripts/orthanc.py install                     apt-get install orthanc orthanc-dicomweb if missing (root)
    python scripts/orthanc.py start [--port 8042] [--dir out/orthanc]
                                                          install if missing, start Orthanc on this machine only,
                                                          load the sample series, run until Ctrl-C
    python scripts/orthanc.py load --url http://HOST:PORT/dicom-web
                                                          upload the sample series to any DICOMweb server (STOW-RS)

Then: python main.py serve --studies http://127.0.0.1:8042/dicom-web
(or all in one: python main.py serve --orthanc). Run with the project's venv python.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from medsam_http.dicom_samples import load_samples
from medsam_http.orthanc import OrthancServer, install
from medsam_http.stack import DEFAULT_WORKDIR


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install orthanc orthanc-dicomweb when missing")
    p = sub.add_parser("start", help="run Orthanc with the sample series until interrupted")
    p.add_argument("--port", type=int, default=8042)
    p.add_argument("--dir", type=Path, default=DEFAULT_WORKDIR, help="config, storage and log (kept between runs)")
    p = sub.add_parser("load", help="upload the sample series to a DICOMweb server")
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    args = parser.parse_args(argv)

    if args.command == "install":
        install()
    elif args.command == "load":
        print(load_samples(args.url.rstrip("/")))
    else:
        install()
        with OrthancServer(args.dir, args.port) as orthanc:
            print(f"sample series: {load_samples(orthanc.dicomweb_url)}")
            print(f"Orthanc on {orthanc.url}, DICOMweb at {orthanc.dicomweb_url} (log {orthanc.log_path}); Ctrl-C stops it",
                  flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
