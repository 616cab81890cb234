"""LiteMedSAM's TinyViT image encoder as the modules its forward runs in turn, so that parts of it can
run in another precision (`encoders.MixedOpenVinoEncoder`, `scripts/ov_bf16_stages.py`). TinyViT's
forward is one function; no library splits it, hence the code here."""

from __future__ import annotations

import math

import torch
from torch import nn


class _Neck(nn.Module):
    """TinyViT's last step: the last stage's tokens (B, N, C) as a square map, then the neck."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1])
        return self.neck(x.view(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2))


def tinyvit_stages(encoder: nn.Module, fine: bool = False) -> list[tuple[str, nn.Module]]:
    """The encoder's forward as named modules run one after the other: the patch embedding with the
    first (convolutional) stage, each attention stage, the neck. `fine` splits the first into the
    patch embedding, each of its MBConv blocks and its patch merging. ValueError for another encoder."""
    if not all(hasattr(encoder, part) for part in ("patch_embed", "layers", "neck")):
        raise ValueError(f"{type(encoder).__name__} is not a TinyViT encoder (LiteMedSAM's)")
    first = encoder.layers[0]
    head = ([("stem", encoder.patch_embed), *[(f"stage0.block{i}", b) for i, b in enumerate(first.blocks)],
             ("stage0.merge", first.downsample)] if fine
            else [("stem+stage0", nn.Sequential(encoder.patch_embed, first))])
    return [*head, *[(f"stage{i}", encoder.layers[i]) for i in range(1, len(encoder.layers))],
            ("neck", _Neck(encoder.neck))]


def split_after_first_stage(encoder: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(head, tail): the patch embedding and first stage, then everything after; tail(head(x)) is the
    encoder's output."""
    stages = [module for _, module in tinyvit_stages(encoder)]
    return stages[0], nn.Sequential(*stages[1:])
