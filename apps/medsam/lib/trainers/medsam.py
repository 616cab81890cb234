"""The `medsam` train task: MONAI Label's request and datastore in, the engine's fine-tuning out.

MONAI Label runs it in a subprocess of the server (POST /train/medsam, Slicer's and OHIF's train
buttons), so inference keeps serving; on a CPU the subprocess lowers its priority and uses half
the cores. The best epoch is published to the file the infer task hot-reloads; `GET /train/`
shows the subprocess's log and `GET /info/` the stats below (also as a PNG beside them).

An epoch is published only when no trained label value fell by more than `max_drop` DSC below the
served model on the held-back blocks of slices (the reason of a refusal is in the stats and the
log). `gpus`: "all", or the CUDA device indices to train on ("0,2"); two or more with
`multi_gpu` run one process per GPU.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from medsam_engine import EngineInputError
from medsam_engine.atomicio import remove_stale_temps
from medsam_engine.checkpoints import read_json, reconcile_manifest
from medsam_engine.datastore import Case
from medsam_engine.training import TrainConfig, die_with_parent, train, train_spawned

from lib.flags import flag
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.async_tasks.utils import processes

logger = logging.getLogger(__name__)

# Options shown by Slicer and OHIF; a list is a choice whose first entry is the default.
DEFAULTS: dict[str, Any] = {
    "max_epochs": 10,
    "train_batch_size": 4,
    "lr": 1e-4,
    "encoder_lr_scale": 0.0,
    "weight_decay": 0.01,
    "val_split": 0.2,
    "early_stop_patience": 3,
    "jitter": 5,
    "loose_boxes": 0.0,
    "max_drop": 0.02,
    "max_train_slices": 0,
    "max_val_slices": 0,
    "publish": ["improved", "best", "never"],
    "precision": ["bf16", "fp16", "fp32"],
    "multi_gpu": True,
    "gpus": "all",
    "num_workers": 0,
    "threads": 0,
    "seed": 0,
}


def _option(request: dict, key: str, kind: type) -> Any:
    value = request.get(key, DEFAULTS[key])
    if isinstance(value, list):
        value = value[0]
    try:
        if kind is bool:
            return flag(value, DEFAULTS[key])
        return kind(value)
    except (TypeError, ValueError):
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"train option {key} must be {kind.__name__}, "
                                                                 f"got {value!r}") from None


PARENT_AT_START = os.getppid()


def _die_with_server() -> None:
    """In MONAI Label's train subprocess: be killed when the server dies (kill -9, OOM), so an
    orphaned run does not go on using the device and publish weights behind a restarted server
    (the ranks it spawns die with it in turn)."""
    if "monailabel.app" not in sys.modules:  # not in the server itself (run_sync=true)
        die_with_parent(PARENT_AT_START)


def gpu_ids(value: object, available: int) -> list[int]:
    """The `gpus` option: "all" (or empty) for every visible GPU, else CUDA indices "0,2"."""
    text = str(value if value is not None else "all").strip().lower()
    if text in ("", "all"):
        return list(range(available))
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                  f"train option gpus must be 'all' or GPU indices like '0,1', got {value!r}") from None
    wrong = [i for i in ids if not 0 <= i < available]
    if wrong or len(set(ids)) != len(ids) or not ids:
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"train option gpus={value!r}: this server has "
                                                                 f"{available} GPU(s) (indices 0-{available - 1})")
    return ids


class MedSAMTrain(TrainTask):
    def __init__(self, model: str, model_dir: str | os.PathLike, publish_path: str | os.PathLike,
                 served_checkpoint: Callable[[], str | None], device: str | None) -> None:
        super().__init__("Fine-tune MedSAM on the final labels: mask decoder trained (image encoder too with "
                         "encoder_lr_scale > 0); an epoch that forgets is not published, the best one is served at once")
        self.model = model
        self.model_dir = Path(model_dir)
        self.publish_path = Path(publish_path)
        self.stats_path = self.model_dir / "train_stats.json"
        self.served_checkpoint = served_checkpoint
        self.device = device
        self._recover()

    def _recover(self) -> None:
        """After a crash: delete checkpoint temporaries whose writer is gone, and point the
        manifest at the weights actually served (a publish killed before its manifest)."""
        for stale in remove_stale_temps(self.model_dir, recursive=True):
            logger.warning("removed %s, left by a checkpoint write that did not finish", stale)
        try:
            reconcile_manifest(self.publish_path)
        except OSError:  # a full disk: serving does not need the manifest
            logger.exception("could not update the manifest of %s", self.publish_path)

    def config(self) -> dict:
        return dict(DEFAULTS)

    def stats(self) -> dict:
        """The last run's stats; a run still marked running with no train process left was stopped
        or killed (it could not write so itself)."""
        stats = read_json(self.stats_path, {})
        if stats.get("status") == "running" and not processes("train"):
            stats["status"] = "stopped"
        return stats

    def info(self) -> dict:
        info = super().info()
        info["published"] = str(self.publish_path)
        return info

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        _die_with_server()
        cases = self._cases(datastore)
        cfg = TrainConfig(
            output_dir=self.model_dir / "runs" / time.strftime("%Y%m%d_%H%M%S"),
            publish_path=self.publish_path, stats_path=self.stats_path, model=self.model,
            checkpoint=self.served_checkpoint(), device=self.device,
            max_epochs=_option(request, "max_epochs", int), batch_size=_option(request, "train_batch_size", int),
            lr=_option(request, "lr", float), weight_decay=_option(request, "weight_decay", float),
            encoder_lr_scale=_option(request, "encoder_lr_scale", float),
            jitter=_option(request, "jitter", float), loose_boxes=_option(request, "loose_boxes", float),
            val_split=_option(request, "val_split", float),
            max_drop=_option(request, "max_drop", float),
            max_train_slices=_option(request, "max_train_slices", int),
            max_val_slices=_option(request, "max_val_slices", int),
            early_stop_patience=_option(request, "early_stop_patience", int),
            precision=_option(request, "precision", str), publish_mode=_option(request, "publish", str),
            num_workers=_option(request, "num_workers", int), seed=_option(request, "seed", int),
        )
        available = torch.cuda.device_count() if torch.cuda.is_available() and self.device != "cpu" else 0
        gpus = gpu_ids(_option(request, "gpus", str), available) if available else []
        if len(gpus) == 1:
            cfg.device = f"cuda:{gpus[0]}"
        if not gpus:
            # Share the CPU with the server: lower priority, half the cores unless told otherwise.
            os.nice(10)
            torch.set_num_threads(_option(request, "threads", int) or max(1, (os.cpu_count() or 2) // 2))
        logger.info("fine-tuning %s from %s on %d labelled images", self.model, cfg.checkpoint or "bundled weights",
                    len(cases))
        try:
            if _option(request, "multi_gpu", bool) and len(gpus) > 1:
                # MONAI Label's multi_gpu: one process per GPU (DDP, NCCL), as its BasicTrainTask does.
                return train_spawned(cfg, cases, gpus)
            if len(gpus) > 1:
                cfg.device = f"cuda:{gpus[0]}"
            return train(cfg, cases)
        except EngineInputError as exc:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(exc)) from None

    @staticmethod
    def _cases(datastore: Datastore) -> list[Case]:
        final = DefaultLabelTag.FINAL.value
        cases = []
        for image_id in sorted(datastore.get_labeled_images()):
            label_id = datastore.get_label_by_image_id(image_id, final)
            if label_id:
                cases.append(Case(image_id, Path(datastore.get_image_uri(image_id)),
                                  Path(datastore.get_label_uri(label_id, final))))
        if not cases:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "no final labels to train on: save some first")
        return cases
