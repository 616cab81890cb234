"""The `medsam` task's configuration, from MONAI Label's `--conf KEY VALUE` options.

    --conf model medsam-lite|medsam-vit-b   engine model (default medsam-lite, bundled, no download)
    --conf checkpoint PATH                  weights for the model (required for medsam-vit-b)
    --conf device cpu|cuda                  default: cuda when present
    --conf labels "liver,spleen,..."        names offered to OHIF/Slicer (MedSAM itself is class-free)
    --conf prefetch_slices N                slices encoded in the background per open image (0: off)
    --conf cache_mb N                       embedding cache size (default 1024)
    --conf threads N                        torch CPU threads per job (default 1, see MedSAM.infer)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from lib.infers import MedSAMInfer
from lib.infers.engines import SegmenterPool
from lib.infers.prefetch import Prefetcher
from lib.infers.volumes import VolumeCache
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

DEFAULT_LABELS = ("lesion", "liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach",
                  "gallbladder", "aorta", "lung_nodule", "tumor")


def _int(conf: Dict[str, str], key: str, default: int) -> int:
    try:
        return int(conf.get(key, default))
    except ValueError:
        raise ValueError(f"--conf {key} must be an integer, got {conf[key]!r}") from None


class MedSAM(TaskConfig):
    """One infer task (`medsam`); no trainer: MedSAM fine-tuning is not part of this app."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        labels = conf.get("labels")
        self.labels = [s.strip() for s in labels.split(",") if s.strip()] if labels else list(DEFAULT_LABELS)
        self.model = conf.get("model", "medsam-lite")
        self.path = conf.get("checkpoint") or None
        self.device = conf.get("device") or None
        self.prefetch_slices = _int(conf, "prefetch_slices", 64)
        self.cache_bytes = _int(conf, "cache_mb", 1024) << 20
        self.threads = _int(conf, "threads", 1)

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        # A request and the background encoder run at once; with torch's default (one thread per
        # core) each oversubscribes the CPU, and on 2 shared cores a cached box took 1.5 s instead
        # of 0.17 s (measured). One thread per job lets them run side by side.
        torch.set_num_threads(max(1, self.threads))
        pool = SegmenterPool(self.model, self.path, self.device, self.cache_bytes)
        version = pool.get().model.version
        return {self.name: MedSAMInfer(pool, VolumeCache(), Prefetcher(self.prefetch_slices), self.labels,
                                       description=f"MedSAM box prompts ({version}): draw a box or click its corners")}

    def trainer(self) -> Optional[TrainTask]:
        return None
