"""Labels saved against a DICOM series: checked against the series' grid, written as DICOM SEG.

The SEG is written with pydicom-seg (PyPI, installed with MONAI Label), not with MONAI Label's
default dcmqi tools, which it downloads from GitHub at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS

from lib.datastore.errors import LabelRejected

# Colours for names MONAI Label's anatomy table does not know, by segment number.
PALETTE = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (200, 0, 255), (0, 220, 220))

# Geometry tolerances: a label written by a client (NRRD, NIfTI) carries the series' grid rounded
# to float32 or a few decimals.
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3
ORIGIN_ATOL_VOXELS = 0.05


@dataclass(frozen=True)
class Segment:
    value: int
    name: str
    rgb: tuple[int, int, int]


def read_series(series_dir: str | Path) -> tuple[sitk.Image, list[Path]]:
    """The series as SimpleITK reads it (GDCM, sorted by position) and its files in slice order."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series_dir))
    if not files:
        raise FileNotFoundError(f"no DICOM series in {series_dir}")
    reader.SetFileNames(files)
    return reader.Execute(), [Path(f) for f in files]


def _read_file(path: Path, reference: sitk.Image) -> sitk.Image:
    if path.name.endswith(".bin"):
        # OHIF's MonaiLabelClient.save_label sends the raw voxels (uint8, x fastest), as MONAI
        # Label's binary_to_image reads them.
        data = np.fromfile(path, dtype=np.uint8)
        size = reference.GetSize()
        if data.size != int(np.prod(size)):
            raise LabelRejected(f"label.bin has {data.size} voxels; the image has {'x'.join(map(str, size))} = "
                                f"{int(np.prod(size))}")
        image = sitk.GetImageFromArray(data.reshape(tuple(reversed(size))))
        image.CopyInformation(reference)
        return image
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].replace(str(path), path.suffix or "file")
        raise LabelRejected(f"cannot read the label file: {reason}") from None


def _check_grid(label: sitk.Image, reference: sitk.Image) -> None:
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise LabelRejected(f"the label has {label.GetNumberOfComponentsPerPixel()} values per voxel; "
                            "send one label value per voxel (a labelmap)")
    if label.GetSize() != reference.GetSize():
        raise LabelRejected(f"label size {'x'.join(map(str, label.GetSize()))} does not match the image "
                            f"({'x'.join(map(str, reference.GetSize()))})")
    if not np.allclose(label.GetSpacing(), reference.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        raise LabelRejected(f"label spacing {label.GetSpacing()} does not match the image ({reference.GetSpacing()})")
    if not np.allclose(label.GetDirection(), reference.GetDirection(), atol=DIRECTION_ATOL):
        raise LabelRejected(f"label orientation {label.GetDirection()} does not match the image "
                            f"({reference.GetDirection()})")
    offset = np.abs(np.subtract(label.GetOrigin(), reference.GetOrigin()))
    if np.any(offset > ORIGIN_ATOL_VOXELS * min(reference.GetSpacing())):
        raise LabelRejected(f"label origin {label.GetOrigin()} does not match the image ({reference.GetOrigin()})")


def read_label(path: str | Path, reference: sitk.Image) -> sitk.Image:
    """The label file as a uint16 image on exactly the reference's grid, or LabelRejected."""
    label = _read_file(Path(path), reference)
    _check_grid(label, reference)
    array = sitk.GetArrayFromImage(label).reshape(tuple(reversed(reference.GetSize())))
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
            raise LabelRejected("label values must be whole numbers (segment numbers)")
    if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
        raise LabelRejected("label values must lie in 0..65535 (0 is background)")
    if not array.any():
        raise LabelRejected("the label is empty (all voxels 0): nothing to save")
    out = sitk.GetImageFromArray(array.astype(np.uint16))
    out.CopyInformation(reference)
    return out


def segments(values: Sequence[int], label_info: Any) -> list[Segment]:
    """Names and colours for the label's values, from the request's `label_info` ([{name, idx}],
    as Slicer sends) or `label_names` ({name: value}, as the infer reply gives)."""
    names: dict[int, str] = {}
    info = label_info if isinstance(label_info, dict) else {}
    entries = info.get("label_info")
    if isinstance(entries, list):
        for position, entry in enumerate(e for e in entries if isinstance(e, dict) and e.get("name")):
            value = entry.get("idx", entry.get("id"))
            key = int(value) if isinstance(value, (int, float)) and value == int(value) else None
            if key not in values and position < len(values):
                key = values[position]  # no usable idx: the n-th value present, as MONAI Label maps them
            if key is not None:
                names.setdefault(key, str(entry["name"]))
    label_names = info.get("label_names")
    if isinstance(label_names, dict):
        for name, value in label_names.items():
            if isinstance(value, (int, float)) and value == int(value):
                names.setdefault(int(value), str(name))
    result = []
    for n, value in enumerate(values):
        name = names.get(value, f"segment {value}")
        colour = GENERIC_ANATOMY_COLORS.get(name.lower()) or PALETTE[n % len(PALETTE)]
        result.append(Segment(value, name, tuple(int(c) for c in colour[:3])))  # type: ignore[arg-type]
    return result


def _template(parts: list[Segment], description: str) -> pydicom.Dataset:
    attributes = [{
        "labelID": s.value,
        "SegmentLabel": s.name[:64],
        "SegmentDescription": s.name[:64],
        "SegmentAlgorithmType": "SEMIAUTOMATIC",
        "SegmentAlgorithmName": "MedSAM",
        "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": "Anatomical Structure"},
        "SegmentedPropertyTypeCodeSequence": {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                                              "CodeMeaning": "Tissue"},
        "recommendedDisplayRGBValue": list(s.rgb),
    } for s in parts]
    return pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "MedSAM^MONAI Label",
        "SeriesDescription": description[:64],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "MedSAM box-prompted segmentation, edited and saved in MONAI Label"[:64],
        "segmentAttributes": [attributes],
    })


def write_seg(label: sitk.Image, source_files: Sequence[Path], label_info: Any, description: str) -> pydicom.Dataset:
    """A DICOM SEG (binary, one frame per slice and segment) of `label` referencing the source series.

    `label` must already be on the series' grid (see `read_label`)."""
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v != 0]
    parts = segments(values, label_info)
    writer = pydicom_seg.MultiClassWriter(template=_template(parts, description), inplane_cropping=False,
                                          skip_empty_slices=False, skip_missing_segment=False)
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
    seg = writer.write(label, sources)
    referenced = {str(s.ReferencedSOPInstanceUID) for item in seg.ReferencedSeriesSequence
                  for s in item.ReferencedInstanceSequence}
    if len(referenced) != len(sources):
        raise LabelRejected(f"the label's slices match {len(referenced)} of the series' {len(sources)} images")
    return seg

