"""The `uncertainty` strategy: of the images with a draft label, the one the model is least sure of."""

from __future__ import annotations

from typing import Callable

from medsam_engine.imageio import read_image
from medsam_engine.strategies import box_uncertainty, pick_uncertain
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from lib.infers.engines import SegmenterPool
from lib.infers.volumes import VolumeCache


class Uncertainty(Strategy):
    """Disagreement of the masks from jittered copies of the draft's boxes, on images that have an
    `original` (draft) label and no final one yet.

    Request options: `slices` (default 3), `boxes` (jittered copies, default 4), `jitter` (px, 10)."""

    def __init__(self, pool: Callable[[], SegmenterPool], volumes: VolumeCache) -> None:
        super().__init__("Uncertainty: the drafted image whose masks change most when its boxes are jittered")
        self.pool = pool
        self.volumes = volumes

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        segmenter = self.pool().get()
        original, final = DefaultLabelTag.ORIGINAL.value, DefaultLabelTag.FINAL.value
        options = {"slices": int(request.get("slices", 3)), "boxes": int(request.get("boxes", 4)),
                   "jitter": float(request.get("jitter", 10))}

        def score(image_id: str, label_id: str) -> Callable[[], float]:
            def compute() -> float:
                volume, _ = self.volumes.get(datastore.get_image_uri(image_id))
                draft = read_image(datastore.get_label_uri(label_id, original)).array
                return box_uncertainty(segmenter, volume, draft, **options)
            return compute

        candidates = {}
        for image_id in datastore.list_images():
            draft = datastore.get_label_by_image_id(image_id, original)
            if draft and not datastore.get_label_by_image_id(image_id, final):
                candidates[image_id] = score(image_id, draft)
        pick = pick_uncertain(candidates)
        if pick is None:
            return {}
        return {"id": pick.image_id, "score": pick.score, "reason": pick.reason, "scores": pick.scores}
