"""`main.py eval` and `main.py bench` run end to end on a tiny datastore cut from the sample CT."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import REPO_ROOT, SAMPLE_DIR

KEEP = {1: "spleen", 5: "liver", 112: "rib_right_9"}  # a large, a mid-size and a small object
SLICES = slice(14, 17)


@pytest.fixture(scope="module")
def tiny_datastore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three slices of ct_3mm with three of its organs, in MONAI Label's layout, plus labels.json."""
    root = tmp_path_factory.mktemp("datastore")
    (root / "labels" / "final").mkdir(parents=True)
    image = sitk.ReadImage(str(SAMPLE_DIR / "ct_3mm.nii.gz"))[:, :, SLICES]
    label = sitk.ReadImage(str(SAMPLE_DIR / "labels" / "final" / "ct_3mm.nii.gz"))[:, :, SLICES]
    array = sitk.GetArrayFromImage(label)
    array[~np.isin(array, list(KEEP))] = 0
    assert all((array == v).any() for v in KEEP), "the cut must hold every kept organ"
    kept = sitk.GetImageFromArray(array)
    kept.CopyInformation(label)
    sitk.WriteImage(image, str(root / "tiny_ct.nii.gz"))
    sitk.WriteImage(kept, str(root / "labels" / "final" / "tiny_ct.nii.gz"))
    (root / "labels.json").write_text(json.dumps({"tiny_ct": {str(k): v for k, v in KEEP.items()}}))
    return root


def run_main(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *args], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("mode", ["2d", "3d", "3d-keys"])
def test_eval_writes_csv_summary_and_plot(tiny_datastore: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "eval"
    run_main("eval", str(tiny_datastore), "--out", str(out), "--mode", mode, "--jitter", "2")
    with open(out / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:5] == ["image", "label", "slice", "dsc", "nsd"]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_datastore / "labels" / "final" / "tiny_ct.nii.gz")))
    if mode == "2d":
        expected = {(str(v), str(k)) for k in range(label.shape[0]) for v in KEEP if (label[k] == v).any()}
        assert {(r["label"], r["slice"]) for r in rows} <= expected
        assert len(rows) >= len(expected) - 1  # one-pixel-thin slivers have no box and are skipped
    else:
        assert sorted(int(r["label"]) for r in rows) == sorted(KEEP) and all(r["slice"] == "" for r in rows)
    assert {r["name"] for r in rows} <= set(KEEP.values())
    for row in rows:
        assert 0.0 <= float(row["dsc"]) <= 1.0 and 0.0 <= float(row["nsd"]) <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary.get("rounded_keys") is (True if mode == "3d-keys" else None)
    overall = summary["overall"]
    assert overall["model"]["n"] == len(rows) == overall["box"]["n"]
    assert overall["model"]["dsc_median"] == pytest.approx(float(np.median([float(r["dsc"]) for r in rows])), abs=1e-3)
    assert set(summary["per_image"]) == {"tiny_ct"}
    liver = summary["per_organ"]["tiny_ct/liver"]
    assert liver["model"]["dsc_median"] > liver["box"]["dsc_median"] + 0.1
    assert (out / "dsc_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_linear_keys_and_the_paired_table(tiny_datastore: Path, tmp_path: Path) -> None:
    """`--linear-keys` is recorded in the summary, and `eval_table.py --compare` counts the objects
    that moved between two runs from their rows."""
    runs = {}
    for name, flags in (("rounded", []), ("linear", ["--linear-keys"])):
        run_main("eval", str(tiny_datastore), "--out", str(tmp_path / name), "--mode", "3d-keys", *flags)
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert runs["rounded"]["rounded_keys"] is True and runs["linear"]["rounded_keys"] is False
    dsc = {}
    for name in runs:
        with open(tmp_path / name / "per_case.csv") as handle:
            dsc[name] = {r["name"]: float(r["dsc"]) for r in csv.DictReader(handle)}
    higher = sum(dsc["rounded"][k] > dsc["linear"][k] + 0.01 for k in dsc["rounded"])
    lower = sum(dsc["rounded"][k] < dsc["linear"][k] - 0.01 for k in dsc["rounded"])
    table = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "eval_table.py"),
                            str(tmp_path / "rounded" / "summary.json"), "--compare",
                            str(tmp_path / "linear" / "summary.json"), "--compare-name", "linear"],
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert (f"of {len(dsc['rounded'])} organs, {higher} higher and {lower} lower than linear by more than 0.01"
            in table)
    assert f"mean DSC {runs['rounded']['overall']['model']['dsc_mean']:.3f}" in table


def test_eval_refuses_an_empty_datastore(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "eval", str(tmp_path), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no labelled images" in result.stderr
    assert not (tmp_path / "out" / "per_case.csv").exists()


def test_bench_reports_engine_figures(tiny_datastore: Path, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    result = run_main("bench", "--json", str(path), "--datastore", str(tiny_datastore), "--repeats", "2", "--no-http")
    figures = json.loads(path.read_text())
    for key in ("encode_ms_p50", "decode_ms_p50", "volume_s"):
        assert figures[key] > 0 and key in result.stdout
    assert figures["volume_slices"] == 3
    assert figures["cpu_count"] >= 1 and figures["torch_threads"] >= 1 and figures["device"] == "cpu"
    assert set(figures["variants"]) == {"fp32-eager", "bf16-eager", "fp32-traced", "ov-fp32", "ov-bf16", "ov-mixed"}
    assert figures["auto_chose"] in ("ov-fp32", "ov-mixed") and figures["auto_first_encode_s"] > 0
    assert figures["variants"]["fp32-eager"]["ratio_to_fp32_eager"] == 1.0
    assert figures["volume_ratio_to_eager"] > 0 and figures["encoder_variant"] in figures["variants"]
    assert figures["volume_dsc"] > 0.5
