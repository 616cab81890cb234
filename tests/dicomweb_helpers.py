"""Helpers for the DICOMweb tests (tests/test_dicomweb_*.py): a real Orthanc holding the sample
series, the real MONAI Label server pointed at it, and DICOM SEG read-back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient

from app_helpers import SERVER_CONF
from medsam_http.dicom_samples import SAMPLE_DICOM
from medsam_http.orthanc import OrthancServer
from medsam_http.server import LabelServer


@dataclass
class Stack:
    """Orthanc with the sample series, and a MONAI Label server reading them through DICOMweb."""

    orthanc: OrthancServer
    server: LabelServer
    series: dict[str, str]  # sample name -> SeriesInstanceUID
    workdir: Path
    restarts: int = field(default=0)

    def restart_server(self) -> None:
        """Stop the server and start a new one on an empty cache: what it knows comes from Orthanc."""
        self.server.stop()
        self.restarts += 1
        self.server.env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(self.workdir / f"cache{self.restarts}")
        self.server.start()


def server_env(workdir: Path, cache: str = "cache") -> dict[str, str]:
    return {"MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(workdir / cache)}


def start_label_server(dicomweb_url: str, workdir: Path) -> LabelServer:
    return LabelServer(dicomweb_url, workdir / "server.log", conf=SERVER_CONF, env=server_env(workdir)).start()


def series_geometry(name: str) -> sitk.Image:
    """A sample series as SimpleITK reads it from the original files (its grid is the truth)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SAMPLE_DICOM / name)))
    return reader.Execute()


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4)


def seg_series(orthanc: OrthancServer) -> list[dict]:
    """QIDO: the SEG series in Orthanc."""
    response = requests.get(f"{orthanc.dicomweb_url}/series", params={"Modality": "SEG"}, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else []


def seg_for(orthanc: OrthancServer, image_series: str) -> list[pydicom.Dataset]:
    """WADO-RS: every SEG instance in Orthanc that references `image_series`."""
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    found = []
    for item in seg_series(orthanc):
        study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        for ds in client.retrieve_series(study, series):
            if any(str(ref.SeriesInstanceUID) == image_series for ref in ds.ReferencedSeriesSequence):
                found.append(ds)
    return found


def seg_to_image(ds: pydicom.Dataset) -> tuple[sitk.Image, dict[int, str]]:
    """A SEG read back with pydicom-seg's reader: the label image and {segment number: label}."""
    result = pydicom_seg.MultiClassReader().read(ds)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    return result.image, names


def save_label(url: str, image: str, path: Path, params: dict | None = None, tag: str = "") -> requests.Response:
    """PUT /datastore/label as the Slicer and OHIF clients do (multipart: params, label)."""
    query = {"image": image, **({"tag": tag} if tag else {})}
    with open(path, "rb") as f:
        return requests.put(f"{url}/datastore/label", params=query, timeout=300,
                            files={"label": (path.name, f), "params": (None, json.dumps(params or {}))})
