"""Helpers shared by the engine tests (tests/test_engine_*.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from torch import nn

from medsam_engine.datastore import Case, label_names
from medsam_engine.dataset import SliceSample, index_slices
from medsam_engine.imageio import Volume, volume_from_sitk
from medsam_engine.models import SamViTSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample-datasets" / "totalseg"

# A ViT SAM small enough to build and run in a test: the real loading code treats it like ViT-B.
TINY_VIT_SPEC = SamViTSpec(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), image_size=256)

MR_LIVER, MR_OTHERS = 5, {1, 2, 3}  # mr_3mm label values: liver; spleen, kidneys


def mr_liver_split(cases: list[Case]) -> tuple[list[SliceSample], list[SliceSample], list[SliceSample]]:
    """A tiny fine-tuning task on mr_3mm (`cases`: its case only): two liver slices to train on, a
    liver slice further on to validate on, and the slices of the other organs."""
    liver = index_slices(cases, {"mr_3mm": {MR_LIVER}})
    third = len(liver) // 3
    return [liver[third], liver[third + 1]], [liver[2 * third]], index_slices(cases, {"mr_3mm": MR_OTHERS})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice similarity of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def make_volume(array: np.ndarray, key: str, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Volume:
    """An in-memory Volume from a (Z, Y, X) array; spacing given as (z, y, x) mm."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return volume_from_sitk(image, key)


def tiny_sam(spec: SamViTSpec = TINY_VIT_SPEC) -> nn.Module:
    """A randomly initialised SAM built here from segment_anything's modules (ViT-B's layout, smaller
    encoder), independent of the engine's own builder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embedding = spec.image_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth, embed_dim=spec.embed_dim, img_size=spec.image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=spec.global_attn_indexes,
            window_size=14, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(embedding, embedding),
            input_image_size=(spec.image_size, spec.image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )


def label_value(image: str, organ: str) -> int:
    """The label value of `organ` in the sample image `image` (names from labels.json)."""
    return next(value for value, name in label_names(SAMPLE_DIR)[image].items() if name == organ)
