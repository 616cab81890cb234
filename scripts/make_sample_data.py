"""Build sample-datasets/totalseg from the TotalSegmentator 2.18.0 source archive (PyPI, Apache-2.0).

    python scripts/make_sample_data.py [--archive totalsegmentator-2.18.0.tar.gz]

Without --archive it runs `pip download --no-deps --no-binary :all: totalsegmentator==2.18.0`.
Writes MONAI Label's local datastore layout: images at the top, masks in labels/final/ with the
same name, and labels.json naming every label value per image (TotalSegmentator's class map).

Two images come without a label, for annotators to label (active learning's *Next Sample*):
ct_chest (the archive's cropped chest CT, tests/reference_files/pulmonary_report/models/
ct_cropped.nii.gz) and mr_brain (the brain MR series in sample-datasets/dicom/mr, as NIfTI).
`list_cases` (the evaluation's) lists only the labelled images.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pydicom
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sample-datasets" / "totalseg"
REF = "totalsegmentator-2.18.0/tests/reference_files/"


def class_maps(source: str) -> dict[str, dict[int, str]]:
    """TotalSegmentator's `class_map` literal (map_to_binary.py), read without importing it."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "class_map":
            return ast.literal_eval(node.value)
    raise RuntimeError("class_map not found")


def read_dicom_series(folder: Path) -> sitk.Image:
    """The CT series, its slices ordered along the slice normal (its UIDs are blank, so GDCM's series
    grouping cannot be used)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    position = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files}
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in sorted(files, key=position.get)])
    return reader.Execute()


def read_mr_series(folder: Path) -> sitk.Image:
    """The brain MR series (oblique axial slices, ordered by GDCM) as one volume."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        archive = args.archive
        if archive is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "totalsegmentator==2.18.0", "-d", tmp], check=True)
            archive = tmp_path / "totalsegmentator-2.18.0.tar.gz"
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path, filter="data")
        src = tmp_path / REF
        maps = class_maps((tmp_path / "totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py").read_text())
        (OUT / "labels" / "final").mkdir(parents=True, exist_ok=True)
        names: dict[str, dict[str, str]] = {}

        def put(name: str, image: sitk.Image, label: sitk.Image, task: str) -> None:
            sitk.WriteImage(image, str(OUT / name), useCompression=True)
            sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), str(OUT / "labels" / "final" / name), useCompression=True)
            values = sorted(int(v) for v in set(sitk.GetArrayViewFromImage(label).ravel().tolist()) if v)
            names[name.split(".")[0]] = {str(v): maps[task][v] for v in values}

        put("ct_3mm.nii.gz", sitk.ReadImage(str(src / "example_ct_sm.nii.gz")),
            sitk.ReadImage(str(src / "example_seg.nii.gz")), "total")
        put("mr_3mm.nii.gz", sitk.ReadImage(str(src / "example_mr_sm.nii.gz")),
            sitk.ReadImage(str(src / "example_seg_mr.nii.gz")), "total_mr")
        ct = read_dicom_series(src / "example_ct_dicom")
        seg = sitk.Resample(sitk.ReadImage(str(src / "example_seg_dicom.nii.gz")), ct, sitk.Transform(),
                            sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        put("ct_512.nii.gz", ct, seg, "total")
        sitk.WriteImage(sitk.ReadImage(str(src / "pulmonary_report" / "models" / "ct_cropped.nii.gz")),
                        str(OUT / "ct_chest.nii.gz"), useCompression=True)
        sitk.WriteImage(read_mr_series(ROOT / "sample-datasets" / "dicom" / "mr"), str(OUT / "mr_brain.nii.gz"),
                        useCompression=True)
        (OUT / "labels.json").write_text(json.dumps(names, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
