"""MONAI Label app serving MedSAM box prompts to OHIF and 3D Slicer (wiring only).

    monailabel start_server --app apps/medsam --studies sample-datasets/totalseg \
        [--conf model medsam-vit-b --conf checkpoint medsam_vit_b.pth]

Options: see lib/configs/medsam.py.
"""

import logging
import os
from typing import Any, Dict

import lib.configs
from lib.datastore import dicomweb_datastore, local_datastore
from lib.endpoints.install import install as install_endpoints

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

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
        self._auto_update_scoring = self.medsam.auto_score

    def init_infers(self) -> Dict[str, InferTask]:
        infers = self.medsam.infer()
        return infers if isinstance(infers, dict) else {self.medsam.name: infers}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {self.medsam.name: self.medsam.trainer()}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {**super().init_strategies(), **self.medsam.strategy()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return self.medsam.scoring_method()

    def on_save_label(self, image_id: str, label_id: str) -> Dict[str, Any]:
        result = super().on_save_label(image_id, label_id) or {}
        if self.medsam.auto_train.label_saved(self.datastore(), image_id, label_id):
            if self.async_training(self.medsam.name):
                self.medsam.auto_train.started()
        return result

    def init_datastore(self) -> Datastore:
        # A folder: MONAI Label's datastore, with labels and its JSON written atomically.
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return local_datastore(self.studies)

    def init_remote_datastore(self) -> Datastore:
        # DICOMweb: MONAI Label's own datastore downloads dcmqi at start; ours needs no download.
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        return dicomweb_datastore(self.studies)

    def info(self) -> Dict[str, Any]:
        meta = super().info()
        meta["medsam"] = {"model": self.medsam.model, "checkpoint": self.medsam.path, "device": self.medsam.device,
                          "prefetch_slices": self.medsam.prefetch_slices, "cache_mb": self.medsam.cache_bytes >> 20,
                          "threads": self.medsam.threads}
        return meta

    def on_init_complete(self) -> None:
        super().on_init_complete()
        install_endpoints(self.medsam.max_upload_mb << 20, self.medsam.allow_remote)
