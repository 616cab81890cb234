"""The `diversity` strategy: the unlabelled image least like the labelled ones (k-center greedy)."""

from __future__ import annotations

import os
from typing import Callable

from medsam_engine.strategies import FeatureCache, image_features, pick_diverse
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.infers.engines import SegmenterPool
from lib.infers.volumes import VolumeCache


class Diversity(Strategy):
    """Pooled encoder features of every image (computed once per image file and model version,
    kept in memory and on disk); picks the unlabelled image farthest from the labelled set.

    Request options: `slices` (per image, default 4)."""

    def __init__(self, pool: Callable[[], SegmenterPool], volumes: VolumeCache, cache_dir: str | os.PathLike) -> None:
        super().__init__("Diversity: the unlabelled image farthest from the labelled ones in MedSAM's feature space")
        self.pool = pool
        self.volumes = volumes
        self.cache = FeatureCache(cache_dir)

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        segmenter = self.pool().get()
        slices = int(request.get("slices", 4))

        def feature(image_id: str) -> Callable:
            def compute():
                volume, _ = self.volumes.get(datastore.get_image_uri(image_id))
                key = f"{volume.key}|{segmenter.model.cache_id}|{slices}"
                return self.cache.get(key, lambda: image_features(segmenter, volume, slices))
            return compute

        labelled = set(datastore.get_labeled_images())
        candidates = {i: feature(i) for i in datastore.list_images() if i not in labelled}
        pick = pick_diverse({i: feature(i) for i in labelled}, candidates)
        if pick is None:
            return {}
        return {"id": pick.image_id, "score": pick.score, "reason": pick.reason, "scores": pick.scores}
