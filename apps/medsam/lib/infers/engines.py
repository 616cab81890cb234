"""The engine's models behind the app: one Segmenter per model name, each loaded once."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
from medsam_engine import MODEL_REGISTRY, EngineInputError, ModelLoadError, Segmenter, load_model
from medsam_engine.cache import EmbeddingCache

logger = logging.getLogger(__name__)


class SegmenterPool:
    """Segmenters by model name, sharing one embedding cache (its keys carry the model version).

    The default model is loaded at start, so a bad `--conf checkpoint` stops the server with the
    loader's message; another registered model is loaded on the first request that names it.
    Fine-tuned weights published by training (`published`) replace the default model's checkpoint
    and are reloaded as soon as the file changes.

    Requests run in MONAI Label's (FastAPI's) request threads, as many at once as clients send.
    Encodes are the heavy part: at most `max_encodes` run at once (default: on a CPU, as many as
    the cores hold jobs of torch's thread count; on a GPU, one), the others queue, while boxes on
    cached slices are decoded at once. Measured with 8 clients on 2 cores (medsam_http.load).
    """

    def __init__(self, default: str, checkpoint: str | None, device: str | None, cache_bytes: int,
                 published: str | os.PathLike | None = None, max_encodes: int | None = None) -> None:
        self.default = default
        self._checkpoints = {default: checkpoint}
        self._device = device
        self.published = Path(published) if published else None
        self._published_seen: tuple | None = None
        self.cache = EmbeddingCache(max_bytes=cache_bytes, max_computing=max_encodes or self._default_encodes())
        self._segmenters: dict[str, Segmenter] = {}
        self._lock = threading.Lock()
        self.get(default)

    def _default_encodes(self) -> int:
        if (self._device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // torch.get_num_threads())

    def served_checkpoint(self) -> str | None:
        """The default model's weights now: the published fine-tuned file when there is one."""
        if self.published is not None and self.published.is_file():
            return str(self.published)
        return self._checkpoints[self.default]

    def _reload_published(self) -> None:
        """Hot reload: when training has published new weights (an atomic rename, so the file is
        whole), load them for this and later requests. A file that fails to load is logged and
        skipped until it changes again; the model in use keeps serving."""
        try:
            stat = self.published.stat()  # type: ignore[union-attr]
        except FileNotFoundError:
            return
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen == self._published_seen:
            return
        self._published_seen = seen
        try:
            model = load_model(self.default, str(self.published), self._device)
        except ModelLoadError:
            if self.default not in self._segmenters:  # at start: stop the server with the reason
                raise
            logger.exception("published weights %s could not be loaded; still serving %s", self.published,
                             self._segmenters[self.default].model.version)
            return
        self._segmenters[self.default] = Segmenter(model, cache=self.cache)
        logger.info("serving published weights %s (%s)", model.version, self.published)

    def get(self, name: str | None = None) -> Segmenter:
        """The segmenter for `name` (default model when empty); unknown or unloadable: input error."""
        name = str(name).strip() if name else self.default
        with self._lock:
            if name == self.default and self.published is not None:
                self._reload_published()
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
                         "encoder": s.model.encoder_variant}
                  for name, s in self._segmenters.items()}
        return {"default": self.default, "loaded": loaded, "registered": sorted(MODEL_REGISTRY),
                "published": str(self.published) if self.published else None,
                "cache": {"entries": len(self.cache), "bytes": self.cache.nbytes, "max_bytes": self.cache.max_bytes,
                          "max_encodes": self.cache.max_computing}}
