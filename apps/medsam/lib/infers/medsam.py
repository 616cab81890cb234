"""The `medsam` infer task: MedSAM box prompts from Slicer, OHIF and scripts, on 3D volumes and 2D images."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Sequence, Tuple, Union

from medsam_engine import SegmentationResult, Segmenter
from medsam_engine.geometry import check_box
from medsam_engine.imageio import Volume

from lib.flags import flag
from lib.infers.drafts import DraftWriter
from lib.infers.engines import SegmenterPool
from lib.infers.output import result_format, write_result
from lib.infers.prefetch import Prefetcher
from lib.infers.prompts import LABEL_VALUE, Translation, translate
from lib.infers.volumes import VolumeCache
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

logger = logging.getLogger(__name__)

MODEL_PARAM = "medsam_model"  # the request's `model`, renamed by the endpoint (MONAI Label uses `model` for the task)


class MedSAMInfer(InferTask):
    """Thin request translation over the engine: prompts in, label file and figures out.

    Images stay loaded per path (`VolumeCache`), slice embeddings stay in the engine's cache, and
    after each request the open image's other slices are encoded in the background (`Prefetcher`).
    An answer on a datastore image is merged into that image's draft (`drafts`, see drafts.py).
    """

    def __init__(self, pool: SegmenterPool, volumes: VolumeCache, prefetcher: Prefetcher,
                 labels: Sequence[str], drafts: DraftWriter | None = None,
                 description: str = "MedSAM: segment what a box encloses") -> None:
        super().__init__(
            type=InferType.DEEPGROW,
            labels=list(labels),
            dimension=3,
            description=description,
            config={"window": "auto", "modality": "", "model": pool.default},
        )
        self.pool = pool
        self.volumes = volumes
        self.prefetcher = prefetcher
        self.drafts = drafts

    def is_valid(self) -> bool:
        return True

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["medsam"] = self.describe()
        return info

    def describe(self) -> dict:
        return {"models": self.pool.describe(), "background_encoding": self.prefetcher.status(),
                "drafts": self.drafts.status() if self.drafts is not None else None}

    def __call__(self, request: dict) -> Tuple[Union[str, None], Dict]:
        start = time.perf_counter()
        with self.prefetcher.request():
            volume, was_open = self.volumes.get(request["image"])
            load_ms = (time.perf_counter() - start) * 1000
            segmenter = self.pool.get(request.get(MODEL_PARAM))
            translation = translate(request, volume.num_slices)
            extension, dtype = result_format(request.get("result_extension"), request.get("result_dtype"))
            result = segmenter.segment(volume, translation.prompts, request.get("modality"), request.get("window"))
            written = time.perf_counter()
            path = write_result(result.label, volume, extension, dtype, flag(request.get("result_compress"), True))
            write_ms = (time.perf_counter() - written) * 1000
        self._encode_around(segmenter, volume, translation, result, request.get("window"))
        draft = None
        if self.drafts is not None:
            draft = self.drafts.save(request["image"], volume, result.label, request.get("label"),
                                     segmenter.model.version)
        latency = {"load": load_ms, "encode": result.timings_ms.get("encode", 0.0),
                   "decode": result.timings_ms.get("decode", 0.0), "write": write_ms,
                   "total": (time.perf_counter() - start) * 1000}
        reply = self._reply(request, segmenter, translation, result, was_open, latency)
        reply["draft"] = draft
        return path, reply

    def _encode_around(self, segmenter: Segmenter, volume: Volume, translation: Translation,
                       result: SegmentationResult, window: object) -> None:
        """Encode the slices around the user's in the background, preprocessed as this request was
        (for CT the engine picks the window from the box, as here)."""
        box, k = translation.focus
        height, width = volume.slice_shape
        normaliser = segmenter.normaliser(volume, result.modality, window, check_box(box, height, width)[0], k)
        self.prefetcher.focus(segmenter, volume, normaliser, k)

    @staticmethod
    def _reply(request: dict, segmenter: Segmenter, translation: Translation, result: SegmentationResult,
               was_open: bool, latency: dict) -> dict:
        objects = [{
            "label": o.label,
            "voxels": o.voxels,
            "volume_ml": round(o.volume_ml, 3),
            "slices": [min(o.slices), max(o.slices)] if o.slices else [],
            "iou": {str(k): round(v, 4) for k, v in sorted(o.iou.items())},
            "preprocessing": o.preprocessing,
            "clipped": o.clipped,
            "zoomed_slices": o.zoomed_slices,
            "box_prior_slices": o.prior_slices,
            "decoded_boxes": o.decoded_boxes,
        } for o in result.objects]
        name = str(request.get("label") or "medsam")
        return {
            "label_names": {name: LABEL_VALUE},
            "model": {"name": segmenter.model.name, "version": segmenter.model.version,
                      "encoder": segmenter.model.encoder_variant},
            "mode": translation.mode,
            "modality": result.modality,
            "volume_ml": round(result.volume_ml, 3),
            "window": objects[0]["preprocessing"] if objects else None,
            "iou": objects[0]["iou"] if len(objects) == 1 else None,
            "objects": objects,
            "cache": {"hits": result.cache_hits, "misses": result.cache_misses, "image_was_open": was_open,
                      "bytes": segmenter.cache.nbytes, "max_bytes": segmenter.cache.max_bytes},
            "latency_ms": {k: round(v, 1) for k, v in latency.items()},
        }
