"""Bad input: clear EngineInputError naming the problem, nothing written; boxes partly outside are
clipped and the result says so; labels are written atomically."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import SAMPLE_DIR, make_volume
from medsam_engine import Box3DPrompt, EngineInputError, KeySlicesPrompt, Segmenter, SlicePrompt
from medsam_engine.imageio import read_image, write_label

CT = SAMPLE_DIR / "ct_3mm.nii.gz"  # 30 slices of 101 x 122
LIVER_SLICE, LIVER_BOX = 14, [45, 27, 104, 85]


def segment_and_save(segmenter: Segmenter, image: Path, prompts: list, out_dir: Path, **options) -> Path:
    """What a caller does: read, segment, write the label."""
    volume = read_image(image)
    result = segmenter.segment(volume, prompts, **options)
    return write_label(result.label, volume, out_dir / "label.nii.gz")


def test_good_input_writes_a_label(lite_segmenter, tmp_path: Path) -> None:
    """The control for the tests below: the same call with a good box does write."""
    out = segment_and_save(lite_segmenter, CT, [SlicePrompt(LIVER_BOX, slice=LIVER_SLICE)], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["label.nii.gz"]
    assert read_image(out).array[LIVER_SLICE].sum() > 1000


BAD_PROMPTS = {
    "box wholly outside": ([SlicePrompt([200, 10, 300, 40], slice=3)], "outside the 122x101 image"),
    "box wholly above": ([SlicePrompt([10, -50, 40, -1], slice=3)], "outside"),
    "zero-area box": ([SlicePrompt([10, 10, 10, 40], slice=3)], "zero area"),
    "zero-area clipped box": ([SlicePrompt([121, 10, 300, 40], slice=3)], "zero area"),
    "NaN in box": ([SlicePrompt([math.nan, 10, 40, 40], slice=3)], "finite"),
    "inf in box": ([SlicePrompt([10, 10, math.inf, 40], slice=3)], "finite"),
    "non-numeric box": ([SlicePrompt(["a", 10, 40, 40], slice=3)], "must be numbers"),
    "None in box": ([SlicePrompt([None, 10, 40, 40], slice=3)], "must be numbers"),
    "box as text": ([SlicePrompt("10,10,40,40", slice=3)], "four numbers"),
    "box as None": ([SlicePrompt(None, slice=3)], "four numbers"),
    "box as dict": ([SlicePrompt({"x0": 1}, slice=3)], "four numbers"),
    "three-value box": ([SlicePrompt([10, 10, 40], slice=3)], "four numbers.*got 3"),
    "five-value box": ([SlicePrompt([10, 10, 40, 40, 1], slice=3)], "four numbers.*got 5"),
    "slice past the end": ([SlicePrompt(LIVER_BOX, slice=30)], "slice 30 is out of range: the image has 30 slices"),
    "negative slice": ([SlicePrompt(LIVER_BOX, slice=-1)], "slice -1 is out of range"),
    "fractional slice": ([SlicePrompt(LIVER_BOX, slice=2.5)], "integer, got 2.5"),
    "text slice": ([SlicePrompt(LIVER_BOX, slice="top")], "integer, got 'top'"),
    "None slice": ([SlicePrompt(LIVER_BOX, slice=None)], "integer, got None"),
    "bool slice": ([SlicePrompt(LIVER_BOX, slice=True)], "integer, got True"),
    "3D box past the end": ([Box3DPrompt(LIVER_BOX, first=5, last=99)], "slice 99 is out of range"),
    "3D box NaN": ([Box3DPrompt([math.nan, 1, 2, 3], first=5, last=9)], "finite"),
    "key slice out of range": ([KeySlicesPrompt({3: LIVER_BOX, 40: LIVER_BOX})], "slice 40 is out of range"),
    "key slice zero-area box": ([KeySlicesPrompt({3: LIVER_BOX, 8: [5, 5, 5, 5]})], "zero area"),
    "no key slices": ([KeySlicesPrompt({})], "no boxes"),
    "no prompt": ([], "no prompt"),
    "click off the image": ([SlicePrompt(LIVER_BOX, slice=3, foreground=[(500, 5)])], r"click \[500, 5\] is outside"),
    "negative click": ([SlicePrompt(LIVER_BOX, slice=3, background=[(-1, 5)])], "outside"),
    "NaN click": ([SlicePrompt(LIVER_BOX, slice=3, foreground=[(math.nan, 5)])], "outside"),
    "one-number click": ([SlicePrompt(LIVER_BOX, slice=3, foreground=[(5,)])], r"\[x, y\] numbers"),
    "text click": ([SlicePrompt(LIVER_BOX, slice=3, foreground=[("a", "b")])], r"\[x, y\] numbers"),
    "label 0": ([SlicePrompt(LIVER_BOX, slice=3, label=0)], "label values"),
    "label too large": ([SlicePrompt(LIVER_BOX, slice=3, label=70000)], "label values"),
    "non-numeric label": ([SlicePrompt(LIVER_BOX, slice=3, label="liver")], "label"),
    "good prompt then a bad one": ([SlicePrompt(LIVER_BOX, slice=LIVER_SLICE), SlicePrompt(LIVER_BOX, slice=31)],
                                   "out of range"),
}


@pytest.mark.parametrize("prompts, message", BAD_PROMPTS.values(), ids=BAD_PROMPTS.keys())
def test_bad_prompt_is_an_input_error_and_nothing_is_written(lite_segmenter, tmp_path: Path,
                                                             prompts: list, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        segment_and_save(lite_segmenter, CT, prompts, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    ({"modality": "banana"}, "unknown modality 'banana'"),
    ({"window": "banana"}, "unknown CT window 'banana'"),
    ({"window": "0/40"}, "positive"),
], ids=["modality", "window", "zero-width window"])
def test_bad_options_are_input_errors(lite_segmenter, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        segment_and_save(lite_segmenter, CT, [SlicePrompt(LIVER_BOX, slice=3)], tmp_path, **options)
    assert list(tmp_path.iterdir()) == []


# ---- boxes partly outside ----------------------------------------------------------------------
def test_box_partly_outside_is_clipped_and_reported(lite_segmenter, sample_volume) -> None:
    volume, label = sample_volume("ct_3mm")
    inside = lite_segmenter.segment(volume, [SlicePrompt(LIVER_BOX, slice=LIVER_SLICE)])
    beyond = lite_segmenter.segment(volume, [SlicePrompt([104, 85, 45, 27], slice=LIVER_SLICE)])
    assert not inside.objects[0].clipped and not beyond.objects[0].clipped  # inverted corners are not clipping
    partly = lite_segmenter.segment(volume, [SlicePrompt([45, 27, 400, 85], slice=LIVER_SLICE)])
    obj = partly.objects[0]
    assert obj.clipped
    assert partly.label.shape == volume.array.shape
    liver = label.array[LIVER_SLICE] == 5
    assert np.count_nonzero(partly.label[LIVER_SLICE] & liver) > 0.8 * liver.sum()  # still finds the liver
    np.testing.assert_array_equal(beyond.label, inside.label)


def test_3d_and_key_slice_prompts_report_clipping(tiny_vit_model) -> None:
    rng = np.random.default_rng(2)
    volume = make_volume(rng.normal(0, 1, (4, 32, 40)).astype(np.float32), "clip-report")
    segmenter = Segmenter(tiny_vit_model)
    three_d = segmenter.segment(volume, [Box3DPrompt([-10, 5, 20, 25], first=1, last=2)], modality="MR")
    assert three_d.objects[0].clipped
    keys = segmenter.segment(volume, [KeySlicesPrompt({0: [5, 5, 20, 20], 3: [5, 5, 20, 60]})], modality="MR")
    assert keys.objects[0].clipped and keys.objects[0].slices == [0, 1, 2, 3]
    fine = segmenter.segment(volume, [KeySlicesPrompt({0: [5, 5, 20, 20], 3: [5, 5, 20, 31]})], modality="MR")
    assert not fine.objects[0].clipped


# ---- unreadable files --------------------------------------------------------------------------
def _files() -> dict[str, bytes]:
    data = CT.read_bytes()
    raw = gzip.decompress(data)
    return {
        "random.nii.gz": np.random.default_rng(0).bytes(5000),
        "empty.nii.gz": b"",
        "text.png": b"not a picture",
        "truncated.nii.gz": data[: len(data) // 2],
        "truncated.nii": raw[: len(raw) - 1],
    }


@pytest.mark.parametrize("name", ["random.nii.gz", "empty.nii.gz", "text.png", "truncated.nii.gz", "truncated.nii"])
def test_unreadable_file_is_an_input_error_naming_it(lite_segmenter, tmp_path: Path, name: str) -> None:
    source = tmp_path / "in" / name
    source.parent.mkdir()
    source.write_bytes(_files()[name])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EngineInputError, match=rf"cannot read image {name.replace('.', '[.]')}"):
        segment_and_save(lite_segmenter, source, [SlicePrompt(LIVER_BOX, slice=3)], out)
    assert list(out.iterdir()) == []


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="image file not found: gone.nii.gz"):
        read_image(tmp_path / "gone.nii.gz")


# ---- atomic label writes -----------------------------------------------------------------------
@pytest.fixture()
def written(tmp_path: Path):
    volume = make_volume(np.zeros((3, 8, 9), dtype=np.int16), "atomic")
    label = np.zeros((3, 8, 9), dtype=np.uint8)
    label[1, 2:5, 3:6] = 4
    target = write_label(label, volume, tmp_path / "label.nii.gz")
    return volume, label, target


def test_write_label_round_trip(written) -> None:
    volume, label, target = written
    back = sitk.ReadImage(str(target))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label)
    assert back.GetSpacing() == volume.reference.GetSpacing()


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 8, 9), (8, 9), (3, 8, 9, 1)])
def test_wrong_shaped_label_leaves_the_target_unchanged(written, shape: tuple[int, ...]) -> None:
    volume, _, target = written
    before = target.read_bytes()
    with pytest.raises(EngineInputError, match="label shape .* does not match image"):
        write_label(np.ones(shape, dtype=np.uint8), volume, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["label.nii.gz"]


def test_crash_mid_write_leaves_the_target_unchanged(written, monkeypatch: pytest.MonkeyPatch) -> None:
    volume, label, target = written
    before = target.read_bytes()

    def half_write(image: sitk.Image, path: str, *args, **kwargs) -> None:
        Path(path).write_bytes(before[: len(before) // 2])  # a partial file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(OSError, match="No space left"):
        write_label(label * 2, volume, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["label.nii.gz"]
