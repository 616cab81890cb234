"""MedSAM engine: box-prompted medical image segmentation, free of any server framework."""

from .errors import EngineInputError, ModelLoadError
from .models import MODEL_REGISTRY, SamModel, load_model
from .prompts import Box3DPrompt, KeySlicesPrompt, SlicePrompt
from .segmenter import Segmenter, SegmentationResult

__all__ = [
    "MODEL_REGISTRY",
    "Box3DPrompt",
    "EngineInputError",
    "KeySlicesPrompt",
    "ModelLoadError",
    "SamModel",
    "SegmentationResult",
    "Segmenter",
    "SlicePrompt",
    "load_model",
]
