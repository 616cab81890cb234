"""MONAI Label app serving MedSAM box prompts to OHIF and 3D Slicer (wiring only).

    monailabel start_server --app apps/medsam --studies sample-datasets/totalseg \
        [--conf model medsam-vit-b --conf checkpoint medsam_vit_b.pth]

Options: see lib/configs/medsam.py.
"""

import logging
import os
from typing import Any, Dict

import lib.configs
from lib.endpoints import infer as infer_endpoint

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

logger = logging.getLogger(__name__)


class MedSAMApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.medsam = lib.configs.MedSAM()
        self.medsam.init("medsam", os.path.join(app_dir, "model"), conf, None)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSAM",
            description="MedSAM: segment the object a box encloses, in CT, MR and 2D images",
            version="0.1.0",
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers = self.medsam.infer()
        return infers if isinstance(infers, dict) else {self.medsam.name: infers}

    def info(self) -> Dict[str, Any]:
        meta = super().info()
        meta["medsam"] = {"model": self.medsam.model, "checkpoint": self.medsam.path, "device": self.medsam.device,
                          "prefetch_slices": self.medsam.prefetch_slices, "cache_mb": self.medsam.cache_bytes >> 20,
                          "threads": self.medsam.threads}
        return meta

    def on_init_complete(self) -> None:
        super().on_init_complete()
        infer_endpoint.install()
