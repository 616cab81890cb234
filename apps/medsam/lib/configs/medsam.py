"""The `medsam` task's configuration, from MONAI Label's `--conf KEY VALUE` options.

    --conf model medsam-lite|medsam-vit-b   engine model (default medsam-lite, bundled, no download)
    --conf checkpoint PATH                  weights for the model (required for medsam-vit-b)
    --conf device cpu|cuda                  default: cuda when present
    --conf labels "liver,spleen,..."        names offered to OHIF/Slicer (MedSAM itself is class-free)
    --conf prefetch_slices N                slices encoded in the background per open image (0: off)
    --conf cache_mb N                       embedding cache size (default 1024)
    --conf threads N                        torch CPU threads per job (default 1, see MedSAM.infer)
    --conf max_encodes N                    slices encoded at once (default: cores / threads on a CPU, 1 on a GPU);
                                            other uncached requests queue, cached boxes are answered meanwhile
    --conf model_dir PATH                   fine-tuned weights, runs and train stats (default apps/medsam/model);
                                            MODEL_DIR/<model>.pt, once training publishes it, is served
    --conf auto_train_every N               start training after every N new final labels (default 0: off)
    --conf max_upload_mb N                  largest request body (upload) the server reads, in MB (default 1024);
                                            a bigger one gets a 413 before it is stored anywhere
    --conf auto_score true|false            MONAI Label's automatic scoring (draft_dice) at start, after
                                            training and after each next-sample (default false: each run
                                            is a subprocess loading the app; POST /scoring/draft_dice instead)
    --conf allow_remote true|false          serve other hosts (default false: requests from addresses other
                                            than loopback get 403, whatever --host the server binds)
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Union

import torch
from lib.activelearning import Diversity, Uncertainty
from lib.endpoints.guard import DEFAULT_MAX_UPLOAD_MB
from lib.flags import flag
from lib.infers import MedSAMInfer
from lib.infers.drafts import DraftWriter
from lib.infers.engines import SegmenterPool
from lib.infers.prefetch import Prefetcher
from lib.infers.volumes import VolumeCache
from lib.scoring import DraftDice
from lib.trainers import AutoTrain, MedSAMTrain
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.interfaces.utils.app import app_instance

DEFAULT_LABELS = ("lesion", "liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach",
                  "gallbladder", "aorta", "lung_nodule", "tumor")


def _int(conf: Dict[str, str], key: str, default: int) -> int:
    try:
        return int(conf.get(key, default))
    except ValueError:
        raise ValueError(f"--conf {key} must be an integer, got {conf[key]!r}") from None


def _bool(conf: Dict[str, str], key: str) -> bool:
    try:
        return flag(conf.get(key), False)
    except ValueError:
        raise ValueError(f"--conf {key} must be true or false, got {conf[key]!r}") from None


def task_subprocess_method(argv: list[str] | None = None) -> str | None:
    """The method ("train", "scoring", ...) when this process is one of MONAI Label's task
    subprocesses (`python -m monailabel.interfaces.utils.app -m METHOD ...`), else None."""
    argv = sys.argv if argv is None else argv
    if not argv or not argv[0].replace(os.sep, "/").endswith("monailabel/interfaces/utils/app.py"):
        return None
    for flag in ("-m", "--method"):
        if flag in argv[1:-1]:
            return argv[argv.index(flag) + 1]
    return None


class MedSAM(TaskConfig):
    """The `medsam` infer and train tasks, the `diversity` and `uncertainty` strategies and the
    `draft_dice` scoring method, sharing one pool of loaded models."""

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
        self.max_encodes = _int(conf, "max_encodes", 0)
        self.model_dir = conf.get("model_dir") or model_dir
        self.published = os.path.join(self.model_dir, f"{self.model}.pt")
        self.auto_train = AutoTrain(_int(conf, "auto_train_every", 0))
        self.max_upload_mb = _int(conf, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB)
        if self.max_upload_mb < 1:
            raise ValueError(f"--conf max_upload_mb must be at least 1, got {self.max_upload_mb}")
        self.auto_score = _bool(conf, "auto_score")
        self.allow_remote = _bool(conf, "allow_remote")
        self.volumes = VolumeCache()
        self._pool: Optional[SegmenterPool] = None

    def pool(self) -> SegmenterPool:
        """The loaded models (the default one at first use), shared by inference and strategies.

        MONAI Label's task subprocesses (train, scoring) build the whole app, infer task included:
        there the model is loaded on the CPU, leaving the GPU to the training model."""
        if self._pool is None:
            device = "cpu" if task_subprocess_method() not in (None, "infer", "batch_infer") else self.device
            self._pool = SegmenterPool(self.model, self.path, device, self.cache_bytes, published=self.published,
                                       max_encodes=self.max_encodes or None)
        return self._pool

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        # A request and the background encoder run at once; with torch's default (one thread per
        # core) each oversubscribes the CPU, and on 2 shared cores a cached box took 1.5 s instead
        # of 0.17 s (measured). One thread per job lets them run side by side.
        torch.set_num_threads(max(1, self.threads))
        pool = self.pool()
        version = pool.get().model.version
        drafts = DraftWriter(lambda: app_instance().datastore(), self.labels)
        return {self.name: MedSAMInfer(pool, self.volumes, Prefetcher(self.prefetch_slices), self.labels, drafts,
                                       description=f"MedSAM box prompts ({version}): draw a box or click its corners")}

    def trainer(self) -> Optional[TrainTask]:
        return MedSAMTrain(self.model, self.model_dir, self.published, lambda: self.pool().served_checkpoint(),
                           self.device)

    def strategy(self) -> Dict[str, Strategy]:
        return {"diversity": Diversity(self.pool, self.volumes, os.path.join(self.model_dir, "features")),
                "uncertainty": Uncertainty(self.pool, self.volumes)}

    def scoring_method(self) -> Dict[str, ScoringMethod]:
        return {"draft_dice": DraftDice()}
