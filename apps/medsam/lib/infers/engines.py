"""The engine's models behind the app: one Segmenter per model name, each loaded once."""

from __future__ import annotations

import threading

from medsam_engine import MODEL_REGISTRY, EngineInputError, ModelLoadError, Segmenter, load_model
from medsam_engine.cache import EmbeddingCache


class SegmenterPool:
    """Segmenters by model name, sharing one embedding cache (its keys carry the model version).

    The default model is loaded at start, so a bad `--conf checkpoint` stops the server with the
    loader's message; another registered model is loaded on the first request that names it.
    """

    def __init__(self, default: str, checkpoint: str | None, device: str | None, cache_bytes: int) -> None:
        self.default = default
        self._checkpoints = {default: checkpoint}
        self._device = device
        self.cache = EmbeddingCache(max_bytes=cache_bytes)
        self._segmenters: dict[str, Segmenter] = {}
        self._lock = threading.Lock()
        self.get(default)

    def get(self, name: str | None = None) -> Segmenter:
        """The segmenter for `name` (default model when empty); unknown or unloadable: input error."""
        name = str(name).strip() if name else self.default
        with self._lock:
            segmenter = self._segmenters.get(name)
            if segmenter is None:
                if name not in MODEL_REGISTRY:
                    raise EngineInputError(f"unknown model {name!r}; this server has: {', '.join(sorted(MODEL_REGISTRY))}")
                try:
                    model = load_model(name, self._checkpoints.get(name), self._device)
                except ModelLoadError as exc:
                    if name == self.default:
                        raise
                    raise EngineInputError(f"model {name!r} is not available on this server: {exc}") from None
                segmenter = self._segmenters[name] = Segmenter(model, cache=self.cache)
        return segmenter

    def describe(self) -> dict:
        loaded = {name: {"version": s.model.version, "device": str(s.model.device), "input_size": s.model.geometry.size,
                         "encoder_precision": s.model.precision}
                  for name, s in self._segmenters.items()}
        return {"default": self.default, "loaded": loaded, "registered": sorted(MODEL_REGISTRY),
                "cache": {"entries": len(self.cache), "bytes": self.cache.nbytes, "max_bytes": self.cache.max_bytes}}
