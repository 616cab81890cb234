"""Click refinement with the real LiteMedSAM on synthetic slices whose box-only mask has a known error."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import dice, make_volume
from medsam_engine.clicks import Click
from medsam_engine.errors import EngineInputError
from medsam_engine.refine import Refinement, clicks_from, refine

SHAPE = (128, 128)


def disk(cx: int, cy: int, r: int) -> np.ndarray:
    rows, cols = np.ogrid[:SHAPE[0], :SHAPE[1]]
    return (cols - cx) ** 2 + (rows - cy) ** 2 <= r * r


BIG, SMALL = disk(45, 64, 18), disk(88, 64, 9)  # two bright disks 7 px apart


def two_disks(key: str):
    """A grey slice (background 100, disks 800, noise sd 10) holding BIG and SMALL."""
    image = np.full(SHAPE, 100.0, dtype=np.float32)
    image[BIG | SMALL] = 800.0
    image += np.random.default_rng(0).normal(0, 10, SHAPE).astype(np.float32)
    return make_volume(image[None], key)


def test_background_click_removes_the_false_part(lite_segmenter) -> None:
    """The object is BIG; a box drawn over both disks makes the model take SMALL too; one background
    click at SMALL's centre must remove it and keep BIG."""
    volume = two_disks("refine-bg")
    box = (25.0, 44.0, 99.0, 84.0)
    before = Refinement(lite_segmenter, volume, 0, box).mask
    assert before[SMALL].mean() > 0.9, "precondition: the box alone takes the small disk"
    after = refine(lite_segmenter, volume, 0, box, [Click(88, 64, False)]).mask
    assert after[SMALL].mean() < 0.05
    assert after[BIG].mean() > 0.95
    assert dice(after, BIG) > dice(before, BIG) + 0.1


def test_foreground_click_adds_the_missed_part(lite_segmenter) -> None:
    """The object is both disks; the box is drawn around BIG only, so SMALL is missed; one foreground
    click at SMALL's centre must add it without taking the background."""
    volume = two_disks("refine-fg")
    box = (27.0, 46.0, 63.0, 82.0)
    before = Refinement(lite_segmenter, volume, 0, box).mask
    assert before[SMALL].mean() < 0.05, "precondition: the box alone misses the small disk"
    after = refine(lite_segmenter, volume, 0, box, clicks_from([(88, 64)], [])).mask
    assert after[SMALL].mean() > 0.9
    assert after[BIG].mean() > 0.95
    assert (after & ~(BIG | SMALL)).sum() < 0.1 * (BIG | SMALL).sum()


def test_clicks_that_agree_with_the_mask_change_nothing(lite_segmenter) -> None:
    volume = two_disks("refine-agree")
    box = (25.0, 44.0, 99.0, 84.0)
    run = Refinement(lite_segmenter, volume, 0, box)
    before = run.mask.copy()
    np.testing.assert_array_equal(run.add(Click(45, 64, True)), before)
    np.testing.assert_array_equal(run.add(Click(5, 5, False)), before)


def test_unknown_method_is_an_input_error(lite_segmenter) -> None:
    with pytest.raises(EngineInputError, match="unknown refinement"):
        Refinement(lite_segmenter, two_disks("refine-bad"), 0, (25.0, 44.0, 99.0, 84.0), method="magic")


def test_interactive_eval_writes_curves_noc_and_loose_tables(tmp_path) -> None:
    """`evaluate_interactive` on a two-slice datastore: one row per object, loose level and refinement,
    curves of 1 + N DSCs, NoC within 0..N, summaries that agree with the CSV, and the plots."""
    import csv
    import json

    import SimpleITK as sitk

    from medsam_engine.evaluate_interactive import evaluate_interactive

    root = tmp_path / "store"
    (root / "labels" / "final").mkdir(parents=True)
    image = np.stack([np.asarray(two_disks("unused").array[0]), np.asarray(two_disks("unused").array[0]).T])
    label = np.stack([BIG.astype(np.uint8) + 2 * SMALL, (BIG.astype(np.uint8) + 2 * SMALL).T])
    sitk.WriteImage(sitk.GetImageFromArray(image), str(root / "disks.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "labels" / "final" / "disks.nii.gz"))
    (root / "labels.json").write_text(json.dumps({"disks": {"1": "big", "2": "small"}}))

    summary = evaluate_interactive(root, tmp_path / "clicks", loose=(0, 25), clicks=2, refine=("rules", "points"),
                                   device="cpu")
    with open(tmp_path / "clicks" / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2 * 2  # 4 objects x 2 loose levels x 2 refinements
    assert {r["name"] for r in rows} == {"big", "small"}
    for row in rows:
        assert 0 <= int(row["noc85"]) <= int(row["noc90"]) <= 2
    assert set(summary["click_runs"]) == {"rules, loose 0%", "rules, loose 25%", "points, loose 0%", "points, loose 25%"}
    run = summary["click_runs"]["rules, loose 0%"]
    assert run["overall"]["n"] == 4 and len(run["overall"]["dsc_mean"]) == 3
    chosen = [r for r in rows if r["refine"] == "rules" and r["loose"] == "0"]
    assert run["overall"]["dsc_mean"][2] == pytest.approx(np.mean([float(r["dsc_click2"]) for r in chosen]), abs=1e-3)
    assert (tmp_path / "clicks" / "dsc_per_click.png").read_bytes()[:4] == b"\x89PNG"

    summary = evaluate_interactive(root, tmp_path / "loose", loose=(0, 10, 25), device="cpu")
    assert list(summary["loose_runs"]) == ["0", "10", "25"]
    assert all(run["overall"]["model"]["n"] == 4 for run in summary["loose_runs"].values())
    tight, loosest = summary["loose_runs"]["0"], summary["loose_runs"]["25"]
    assert loosest["overall"]["box"]["dsc_mean"] < tight["overall"]["box"]["dsc_mean"]  # looser boxes, worse filled box
    assert (tmp_path / "loose" / "dsc_boxplot.png").is_file()
