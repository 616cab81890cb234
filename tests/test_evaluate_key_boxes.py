"""`main.py eval --mode 3d-keys --add-boxes N [--next gap]`: key-slice boxes added on the worst slice or in
the largest gap, with the real LiteMedSAM on a synthetic volume whose object jumps sideways on a few
slices between the key slices."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import REPO_ROOT
from medsam_engine.evaluate_interactive import boxes_needed, gap_slice, worst_slice

SLICES, SIDE = 21, 96
JUMP = (4, 5, 6)  # slices where the disk sits 20 px left of where it is on the key slices 0, 10 and 20


def disk(cx: int, cy: int, r: int) -> np.ndarray:
    rows, cols = np.ogrid[:SIDE, :SIDE]
    return (cols - cx) ** 2 + (rows - cy) ** 2 <= r * r


def test_worst_slice_is_the_lowest_slice_dsc_then_the_most_errors() -> None:
    gt = np.zeros((5, 8, 8), dtype=bool)
    gt[:, 2:6, 2:6] = True  # 16 voxels on every slice
    pred = gt.copy()
    pred[1, 2:4, 2:6] = False  # slice 1: 8 missed, DSC 2*8/24 = 0.667
    pred[2, 2:6, 2:4] = False  # slice 2: the same DSC ...
    pred[2, 0, 0] = pred[2, 7, 7] = True  # ... no: 2 extra voxels lower it, 2*8/26 = 0.615
    pred[3] = False  # slice 3: nothing found, DSC 0
    pred[4] = False
    pred[4, 0:2, 0:2] = True  # slice 4: DSC 0 too, with 4 extra voxels: more errors than slice 3
    assert worst_slice(pred, gt, range(5)) == 4
    assert worst_slice(pred, gt, [0, 1, 2, 3]) == 3  # a slice with a key box is no candidate
    assert worst_slice(pred, gt, [0, 1, 2]) == 2
    pred[2, 0, 0] = pred[2, 7, 7] = False  # now slices 1 and 2 tie on DSC and errors: the lower index
    assert worst_slice(pred, gt, [2, 1, 0]) == 1
    assert worst_slice(pred, gt, []) is None


def test_gap_slice_is_the_middle_of_the_largest_gap_between_boxed_slices() -> None:
    assert gap_slice([0, 10, 20], range(21)) == 5  # two gaps of 10: the lower one, its middle
    assert gap_slice([0, 5, 10, 20], range(21)) == 15
    assert gap_slice([0, 4, 10], range(11)) == 7  # gap 4..10, middle 7
    assert gap_slice([0, 3, 10], range(11)) == 6  # gap 3..10, middle 6.5: the lower of the two nearest
    assert gap_slice([0, 10, 20], [1, 7, 12]) == 7  # 5 is no candidate: the nearest one in its gap
    assert gap_slice([0, 10, 20], [12, 19]) == 12  # a gap without candidates is passed over
    assert gap_slice([0, 10], [10, 15]) is None  # no candidate between two boxed slices
    assert gap_slice([4], range(9)) is None  # one boxed slice has no gap


def test_boxes_needed_counts_initial_plus_added_and_caps_misses() -> None:
    row = {"keys": 3, "curve": [0.70, 0.84, 0.86, 0.91]}
    assert boxes_needed(row, 0.85) == 5 and boxes_needed(row, 0.90) == 6
    assert boxes_needed({"keys": 2, "curve": [0.95, 0.96]}, 0.90) == 2  # the key boxes alone reach it
    assert boxes_needed({"keys": 3, "curve": [0.5, 0.6, 0.7]}, 0.85) == 3 + 2 + 1  # never: initial + N + 1


@pytest.fixture(scope="module")
def jump_datastore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One volume: label 1 a disk that jumps sideways on JUMP, label 2 a disk that stays put."""
    root = tmp_path_factory.mktemp("keystore")
    (root / "labels" / "final").mkdir(parents=True)
    label = np.zeros((SLICES, SIDE, SIDE), dtype=np.uint8)
    for k in range(SLICES):
        label[k][disk(28 if k in JUMP else 50, 36, 11)] = 1
        label[k][disk(76, 74, 9)] = 2
    image = np.where(label > 0, 800.0, 100.0).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 10, image.shape).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(root / "jump.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "labels" / "final" / "jump.nii.gz"))
    (root / "labels.json").write_text(json.dumps({"jump": {"1": "jumper", "2": "still"}}))
    return root


def test_added_boxes_go_on_the_worst_slices_and_raise_the_volume_dsc(jump_datastore: Path, tmp_path: Path) -> None:
    from medsam_engine.evaluate_interactive import evaluate_key_boxes

    out = tmp_path / "keys"
    summary = evaluate_key_boxes(jump_datastore, out, keys=3, add_boxes=3, device="cpu")
    with open(out / "per_case.csv") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"jumper", "still"}
    jumper, still = rows["jumper"], rows["still"]
    assert jumper["keys"] == still["keys"] == "3"
    added = [int(k) for k in jumper["added_slices"].split(";")]
    # the interpolated boxes miss the jumped disk, so one of its slices is the worst; later boxes go
    # where the new interpolation is worst, never twice on a slice nor on a key slice
    assert added[0] in JUMP and len(set(added)) == 3 and not set(added) & {0, 10, 20}
    curve = [float(jumper["dsc"])] + [float(jumper[f"dsc_box{i}"]) for i in (1, 2, 3)]
    assert curve[0] < 0.9 and curve[-1] > curve[0] + 0.05
    for t in (85, 90):  # boxes-to-threshold agrees with the recorded curve
        reached = [i for i, v in enumerate(curve) if v >= t / 100]
        assert int(jumper[f"boxes{t}"]) == (3 + reached[0] if reached else 3 + 3 + 1)
    assert float(still["dsc"]) > 0.85 and int(still["boxes85"]) == 3

    run = summary["box_runs"]["3 key slices + worst-slice boxes"]
    assert run["overall"]["n"] == 2 and len(run["overall"]["dsc_mean"]) == 4
    assert run["overall"]["dsc_mean"][3] == pytest.approx((curve[3] + float(still["dsc_box3"])) / 2, abs=1e-3)
    assert run["per_organ"]["jump/jumper"]["boxes85_mean"] == int(jumper["boxes85"])
    assert run["overall"]["boxes85_failed"] == pytest.approx(np.mean([max(curve) < 0.85, False]))
    assert summary["initial"]["overall"]["model"]["n"] == 2
    assert (out / "dsc_per_box.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "eval_table.py"), str(out / "summary.json"),
                            "--min-n", "1"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "| group | n | DSC +0 | DSC +1 | DSC +2 | DSC +3 | boxes@85 | never 85 | boxes@90 | never 90 |" in table
    organ = next(line for line in table.splitlines() if line.startswith("| jump/jumper |"))
    assert f"{run['per_organ']['jump/jumper']['dsc_mean'][3]:.3f}" in organ
    assert f"| {int(jumper['boxes85']):.2f} |" in organ


def test_gap_boxes_go_in_the_middle_of_the_largest_gaps(jump_datastore: Path, tmp_path: Path) -> None:
    from medsam_engine.evaluate_interactive import evaluate_key_boxes

    out = tmp_path / "gap"
    summary = evaluate_key_boxes(jump_datastore, out, keys=3, add_boxes=3, device="cpu", next_slice="gap")
    with open(out / "per_case.csv") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    # key slices 0, 10 and 20; then 5 (the lower of two equal gaps), 15, then 2 (four gaps of 5)
    assert rows["jumper"]["added_slices"] == rows["still"]["added_slices"] == "5;15;2"
    assert summary["next"] == "gap"
    run = summary["box_runs"]["3 key slices + gap boxes"]
    for i in (1, 2, 3):  # the curve is each object's volume DSC after each added box
        both = [float(rows[name][f"dsc_box{i}"]) for name in ("jumper", "still")]
        assert run["overall"]["dsc_mean"][i] == pytest.approx(np.mean(both), abs=1e-3)


@pytest.mark.parametrize("flags, message", [
    (["--mode", "3d-keys", "--add-boxes", "0"], "--add-boxes, --keys and --every must be at least 1"),
    (["--mode", "3d-keys", "--add-boxes", "-2"], "--add-boxes, --keys and --every must be at least 1"),
    (["--mode", "3d-keys", "--add-boxes", "2", "--keys", "0"], "--add-boxes, --keys and --every must be at least 1"),
    (["--mode", "2d", "--add-boxes", "2"], "use it with --mode 3d-keys"),
    (["--mode", "3d-keys", "--add-boxes", "2", "--clicks", "3"], "use it with --mode 3d-keys"),
    (["--mode", "3d-keys", "--add-boxes", "two"], "invalid int value"),
    (["--mode", "3d-keys", "--next", "gap"], "use it with --add-boxes"),
    (["--mode", "3d-keys", "--add-boxes", "2", "--next", "best"], "invalid choice"),
])
def test_bad_add_boxes_values_are_refused(jump_datastore: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    out = tmp_path / "refused"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "eval", str(jump_datastore), "--out", str(out),
                             *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr
    assert not (out / "summary.json").exists()
