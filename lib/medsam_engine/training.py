"""Fine-tune MedSAM from labelled volumes with the paper's loss and optimiser (Dice + BCE, AdamW),
prompt encoder frozen, boxes from the label's objects jittered outwards by 0-5 model pixels (the
paper's 0-20 px at 1024). The paper trains the image encoder too; here it is frozen by default
(`encoder_lr_scale` 0): on the sample CT that kept the other organs far better for most of the gain
(scripts/finetune_gain.py); `encoder_lr_scale` > 0 trains it at lr x that. Objects of other label
values that are not trained on (`anchor_samples`, e.g. `main.py train --organ`'s other organs) are
replayed: `replay` of them per training slice join the training set with their labels as targets,
never one the publish gate validates on. The decoder is also distilled towards the starting
(served) model's own masks (weight `distill`, default 50; 0: off): on the exact boxes of other
labelled objects of each training slice (none trained on, none the gate scores), the frozen
starting model's mask probabilities are the targets (see Distilled). Replay and distillation
together kept every other organ within 2 points on the sample data (scripts/finetune_gain.py).
With `loose_boxes` > 0 that share of the draws is prompted with the boxes one-box 3D propagation
gives a slice (see dataset.loose_box); scripts/loose_box_gain.py measured no 3D gain from it on
the sample data, so it is off by default. A frozen encoder's embeddings are computed once per slice
and reused.

One code path for one process, MONAI Label's `multi_gpu` (processes spawned by the app) and
`torchrun` (any number of nodes): the process group comes from the environment (RANK, WORLD_SIZE,
MASTER_ADDR, ...), NCCL on GPUs and gloo on CPUs. The loop is MONAI's SupervisedTrainer and
SupervisedEvaluator (ignite), with the evaluator run on held-back slices before the first epoch
(the starting weights' score) and after each one. The best epoch is published atomically where the
server's infer task reloads it (see checkpoints.py); a run that fails or is killed publishes nothing
more, so the served weights stay as they were.

The publish gate sees forgetting: validation holds whole blocks of slices (never a neighbour of a
training slice), scores every label value on its own, and scores an anchor set (objects that are
not trained on, e.g. the other organs of the labelled images) with the starting (served) weights
before the first epoch. An epoch is published only when no label value and not the anchor set fell
by more than `max_drop` (DSC, default 0.02) below the starting weights; the stats say why not.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Collection, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .atomicio import atomic_write
from .cache import EmbeddingCache
from .checkpoints import publish, read_json, save_checkpoint, write_json
from .datastore import Case, label_names, list_cases
from .dataset import (SliceDataset, SliceSample, distill_objects, index_slices, per_object, split_samples,
                      spread)
from .decoder import predict_masks
from .errors import EngineInputError
from .models import SamModel, load_model
from .segmenter import Segmenter

logger = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PUBLISH_MODES = ("improved", "best", "never")


@dataclass
class TrainConfig:
    """One fine-tuning run. `checkpoint` holds the starting weights (the served ones)."""

    output_dir: Path
    publish_path: Path | None = None  # the served file; None: publish nothing
    stats_path: Path | None = None  # default: output_dir / "train_stats.json"
    model: str = "medsam-lite"
    checkpoint: str | None = None
    device: str | None = None
    max_epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-4
    encoder_lr_scale: float = 0.0  # the image encoder's lr is lr x this (0, the default: encoder frozen)
    weight_decay: float = 0.01
    jitter: float = 5  # model pixels (LiteMedSAM: 256 px; the paper's 0-20 px at 1024)
    loose_boxes: float = 0.0  # share of training draws prompted with the box 3D propagation gives the slice (dataset.loose_box)
    embedding_cache_mb: int = 4096  # a frozen encoder's embeddings kept for reuse across draws and epochs; 0: encode every draw
    val_split: float = 0.2
    val_block: int = 4  # validation holds back blocks of this many neighbouring slices
    max_train_slices: int = 0  # 0: all
    max_val_slices: int = 0
    max_anchor_objects: int = 24  # anchor objects validated each epoch (0: no anchor set)
    replay: float = 2.0  # replayed objects (other labelled objects, never an anchor) per training slice; 0: none
    distill: float = 50.0  # weight of the distillation loss towards the starting model's masks; 0: off
    max_drop: float = 0.02  # publish gate: largest DSC drop of a label value or the anchor set
    early_stop_patience: int = 3  # epochs without a better validation Dice; 0: off
    precision: str = "bf16"  # autocast dtype on GPUs (CPUs train in fp32)
    publish_mode: str = "improved"  # improved: only above the starting weights' Dice; best: this run's best
    num_workers: int = 0
    seed: int = 0
    iou_loss_weight: float = 1.0
    freeze_norm_stats: bool = True
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d_%H%M%S"))

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.publish_path = Path(self.publish_path) if self.publish_path else None
        self.stats_path = Path(self.stats_path) if self.stats_path else self.output_dir / "train_stats.json"
        if self.precision not in PRECISIONS:
            raise EngineInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.publish_mode not in PUBLISH_MODES:
            raise EngineInputError(f"publish must be one of {', '.join(PUBLISH_MODES)}, got {self.publish_mode!r}")
        if self.max_epochs < 1 or self.batch_size < 1:
            raise EngineInputError("max_epochs and batch_size must be at least 1")
        if not 0 <= self.val_split < 1:
            raise EngineInputError(f"val_split must be in [0, 1), got {self.val_split}")
        if min(self.jitter, self.max_drop, self.encoder_lr_scale, self.replay, self.distill, self.embedding_cache_mb) < 0:
            raise EngineInputError("jitter, max_drop, encoder_lr_scale, replay, distill and embedding_cache_mb "
                                   "must not be negative")
        if not 0 <= self.loose_boxes <= 1:
            raise EngineInputError(f"loose_boxes must be in [0, 1], got {self.loose_boxes}")


class PromptedSam(nn.Module):
    """A SAM-style net as one trainable module: (images, boxes in model pixels) -> (mask logits at
    the decoder's resolution (B, 1, L, L), predicted IoU (B,)). The prompt encoder is frozen.

    Each image is decoded with its own box: segment_anything's decoder repeats one embedding per
    prompt, so a batch of images is decoded one by one (the decoder is small next to the encoder).
    With `embedded` the inputs are the images' embeddings (B, C, h, w), for a frozen encoder.
    """

    def __init__(self, net: nn.Module, freeze_norm_stats: bool = True, embedded: bool = False) -> None:
        super().__init__()
        self.net = net
        self.freeze_norm_stats = freeze_norm_stats
        self.embedded = embedded
        for p in net.prompt_encoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PromptedSam":
        super().train(mode)
        self.net.prompt_encoder.eval()
        if mode and self.freeze_norm_stats:
            # Annotators' batches are a few slices: BatchNorm statistics from them would drift from
            # the pretrained ones, so the encoder's norm layers keep their running statistics.
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.embed(images), boxes)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """The embeddings of the inputs: given (`embedded`), else the image encoder's."""
        return inputs if self.embedded else self.net.image_encoder(inputs)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, decoder: nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Box i (B, 4) decoded on embedding i (B, C, H, W) by `decoder` (default: the net's mask decoder)."""
        decoder = decoder or self.net.mask_decoder
        with torch.no_grad():
            sparse, dense = self.net.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
            image_pe = self.net.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for i in range(embeddings.shape[0]):
            low, iou = predict_masks(decoder, embeddings[i:i + 1], image_pe, sparse[i:i + 1], dense[i:i + 1])
            logits.append(low)
            ious.append(iou)
        return torch.cat(logits).float(), torch.cat(ious).float()


class Distilled(nn.Module):
    """The training network with distillation: PromptedSam's (logits, iou) for each image's box,
    then, for its real extra boxes ("distill_box" where "distill_valid"), the student's mask logits
    and the teacher's (the starting mask decoder, a frozen copy). With the image encoder frozen
    (the default) both decode the one image embedding; an encoder that trains gets a frozen copy
    for the teacher's own embedding."""

    def __init__(self, student: PromptedSam) -> None:
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student.net.mask_decoder).requires_grad_(False)
        encoder = student.net.image_encoder
        self.teacher_encoder = (copy.deepcopy(encoder).requires_grad_(False)
                                if any(p.requires_grad for p in encoder.parameters()) else None)

    def train(self, mode: bool = True) -> "Distilled":
        super().train(mode)
        self.teacher.eval()
        if self.teacher_encoder is not None:
            self.teacher_encoder.eval()
        return self

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, extra: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        embeddings = self.student.embed(images)
        logits, iou = self.student.decode(embeddings, boxes)
        owner = torch.arange(images.shape[0], device=images.device).repeat_interleave(extra.shape[1])[valid.flatten()]
        extra = extra.flatten(0, 1)[valid.flatten()]
        if not extra.shape[0]:
            return logits, iou, logits[:0], logits[:0].detach()
        student = self.student.decode(embeddings[owner], extra)[0]
        with torch.no_grad():
            own = embeddings if self.teacher_encoder is None else self.teacher_encoder(images)
            teacher = self.student.decode(own[owner], extra, self.teacher)[0]
        return logits, iou, student, teacher


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student's mask logits against the teacher's: binary KL divergence per pixel (BCE on the
    teacher's probabilities less the teacher's own, so 0 when they agree), mean; 0 with no boxes."""
    if student.numel() == 0:
        return student.sum()
    target = torch.sigmoid(teacher)
    return (F.binary_cross_entropy_with_logits(student, target)
            - F.binary_cross_entropy_with_logits(teacher, target))


class SegmentationLoss(nn.Module):
    """MONAI's DiceCELoss (Dice + BCE on sigmoid logits, MedSAM's loss) plus, as LiteMedSAM's
    training does, the squared error of the predicted IoU against the mask's actual IoU (keeps the
    IoU the server reports meaningful); with Distilled's output also `distill` x distill_loss."""

    def __init__(self, iou_weight: float = 1.0, distill: float = 0.0) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.seg = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.iou_weight = iou_weight
        self.distill = distill

    def forward(self, pred: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        logits, iou = pred[:2]
        loss = self.seg(logits, target)
        if self.distill and len(pred) == 4:
            loss = loss + self.distill * distill_loss(*pred[2:])
        if self.iou_weight:
            with torch.no_grad():
                mask = logits > 0
                truth = target > 0.5
                inter = (mask & truth).flatten(1).sum(1).float()
                union = (mask | truth).flatten(1).sum(1).float()
                actual = inter / union.clamp(min=1)
            loss = loss + self.iou_weight * torch.mean((iou - actual) ** 2)
        return loss


def prepare_batch(batch: dict, device: torch.device | None = None, non_blocking: bool = False, **kwargs: Any):
    """Batches for MONAI's engines: inputs, targets, and the boxes as the network's extra arguments
    (with the distillation boxes where the batch has them: Distilled's)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, non_blocking=non_blocking)

    keys = ("box", "distill_box", "distill_valid") if "distill_box" in batch else ("box",)
    return move(batch["image"]), move(batch["label"]), tuple(move(batch[k]) for k in keys), {}


class _LogitsInferer:
    """Validation keeps the mask logits of PromptedSam's (logits, iou) output."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return network(inputs, *args, **kwargs)[0]


ANCHOR = "anchor"


def collective_device(device: torch.device) -> torch.device:
    """Where tensors for a collective must live: NCCL reduces only CUDA tensors (a CPU tensor in
    an NCCL group fails), gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a tensor over the ranks (a copy, on the collective's device); as is with no process group."""
    if not dist.is_initialized():
        return values.clone()
    reduced = values.detach().to(collective_device(device), dtype=torch.float64)
    dist.all_reduce(reduced)
    return reduced


class GroupDice:
    """Validation Dice per group (each trained label value, and the anchor set), over all ranks.

    Attached to the evaluator before anything that reads its score: at the end of each pass it
    sets `val_dice` (mean over the trained label values, each counted once) and keeps `scores`
    ({group name: mean Dice}) for the publish gate."""

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.device = device
        self.scores: dict[str, float] = {}
        self._sums = torch.zeros(len(self.names), 2, dtype=torch.float64)

    def attach(self, evaluator: Any) -> None:
        from ignite.engine import Events

        evaluator.add_event_handler(Events.EPOCH_STARTED, self._reset)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _reset(self, engine: Any) -> None:
        self._sums.zero_()

    def _update(self, engine: Any) -> None:
        output, batch = engine.state.output, engine.state.batch
        if isinstance(output, dict):
            output, batch = [output], [batch]
        for item, sample in zip(output, batch):
            pred, truth = item["pred"].detach().float() > 0.5, item["label"].detach().float() > 0.5
            total = float(pred.sum() + truth.sum())
            dice = 1.0 if total == 0 else 2.0 * float((pred & truth).sum()) / total
            group = int(sample["group"])
            self._sums[group, 0] += dice
            self._sums[group, 1] += 1

    def _completed(self, engine: Any) -> None:
        sums = all_reduce_sum(self._sums, self.device).cpu()
        self.scores = {name: float(sums[i, 0] / sums[i, 1]) for i, name in enumerate(self.names) if sums[i, 1] > 0}
        trained = [v for name, v in self.scores.items() if name != ANCHOR]
        engine.state.metrics["val_dice"] = sum(trained) / len(trained) if trained else 0.0


def forgetting(scores: dict[str, float], baseline: dict[str, float], max_drop: float) -> str | None:
    """Why weights may not be published: the groups (label values, the anchor set) whose Dice fell
    by more than `max_drop` below the starting weights'; None when none did."""
    fallen = [f"{name} {baseline[name]:.3f} -> {scores[name]:.3f}" for name in baseline
              if name in scores and scores[name] < baseline[name] - max_drop]
    if not fallen:
        return None
    return (f"validation Dice fell by more than {max_drop * 100:g} points below the served model's: "
            + ", ".join(fallen))


def native_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (PyTorch counts emulation unless told not to)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(precision: str, device: torch.device, bf16_native: bool) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`: none on CPUs and for fp32; bf16 only where
    the GPU computes it natively, else fp16 (emulated bf16 is slower than fp32)."""
    dtype = PRECISIONS[precision]
    if device.type != "cuda" or dtype is None:
        return None
    if dtype is torch.bfloat16 and not bf16_native:
        return torch.float16
    return dtype


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[Distributed, torch.device]:
    """The process group from the environment (torchrun, also with one process, or the app's
    spawned workers), and this process's device: NCCL and cuda:LOCAL_RANK on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    if use_cuda:
        index = torch.device(device or "cuda").index
        torch.cuda.set_device(index if index is not None else (local_rank if world > 1 else 0))
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    ctx = Distributed(dist.get_rank() if dist.is_initialized() else 0, world, local_rank)
    return ctx, target


def weights_checksum(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names and bytes), to compare ranks' weights."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RunRecorder:
    """Per-epoch figures (train loss, validation Dice), publishing of better weights, the stats
    JSON that MONAI Label and Slicer show, and the training-curves PNG next to it (main rank)."""

    def __init__(self, cfg: TrainConfig, ctx: Distributed, model: SamModel, net: PromptedSam, info: dict,
                 groups: GroupDice, device: torch.device) -> None:
        self.cfg, self.ctx, self.model, self.net = cfg, ctx, model, net
        self.groups, self.device = groups, device
        self.start = time.time()
        self.losses: list[float] = []
        self.samples = 0
        self.epoch_start = self.start
        self.stats: dict[str, Any] = {
            "status": "running", "run_id": cfg.run_id, "model": model.name, "start_version": model.version,
            "epoch": 0, "total_epochs": cfg.max_epochs, "best_metric": None, "best_metric_epoch": None,
            "baseline_val_dice": None, "baseline_by_group": None, "published": None, "publish_refused": None,
            "max_drop": cfg.max_drop, "history": [], "start_ts": int(self.start),
            "world_size": ctx.world_size, "config": _plain(dataclasses.asdict(cfg)), **info,
        }
        self._best = float("-inf")

    def attach(self, trainer: Any, evaluator: Any) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: self._validated(engine, trainer))

    def _epoch_started(self, engine: Any) -> None:
        self.epoch_start, self.samples = time.time(), 0

    def _iteration(self, engine: Any) -> None:
        self.losses.append(_loss(engine.state.output))
        self.samples += int(engine.state.batch["image"].shape[0])

    def _epoch(self, engine: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.time() - self.epoch_start
        steps = len(self.losses)
        loss = all_reduce_sum(torch.tensor([sum(self.losses), steps, self.samples], dtype=torch.float64), self.device)
        self.losses = []
        self.stats["history"].append({"epoch": engine.state.epoch, "train_loss": float(loss[0] / max(loss[1], 1)),
                                      "val_dice": None, "seconds": round(time.time() - self.start, 1),
                                      "train_seconds": round(seconds, 3), "steps": steps,
                                      "samples": int(loss[2])})
        self.stats["epoch"] = engine.state.epoch

    def _validated(self, evaluator: Any, trainer: Any) -> None:
        dice = float(evaluator.state.metrics["val_dice"])
        scores = {k: round(v, 6) for k, v in self.groups.scores.items()}
        epoch = trainer.state.epoch
        if epoch == 0:
            self.stats["baseline_val_dice"], self.stats["baseline_by_group"] = dice, scores
            self._best = dice if self.cfg.publish_mode == "improved" else float("-inf")
            self.write()
            return
        self.stats["history"][-1].update(val_dice=dice, by_group=scores)
        refusal = forgetting(scores, self.stats["baseline_by_group"], self.cfg.max_drop)
        if self.ctx.main:  # MONAI Label shows the train subprocess's last log lines in GET /train/
            logger.info("epoch %d/%d: train loss %.4f, validation Dice %.4f (starting weights %.4f); by group %s",
                        epoch, self.cfg.max_epochs, self.stats["history"][-1]["train_loss"], dice,
                        self.stats["baseline_val_dice"], scores)
        if self.stats["best_metric"] is None or dice > self.stats["best_metric"]:
            self.stats["best_metric"], self.stats["best_metric_epoch"] = dice, epoch
        wanted = dice > self._best and self.cfg.publish_path is not None and self.cfg.publish_mode != "never"
        if wanted and refusal:
            self.stats["publish_refused"] = f"epoch {epoch} not published: {refusal}"
            if self.ctx.main:
                logger.warning("%s", self.stats["publish_refused"])
        if self.ctx.main:
            state = self.net.state_dict()
            inner = {k[len("net."):]: v for k, v in state.items()}
            meta = {"run_id": self.cfg.run_id, "epoch": epoch, "val_dice": dice, "start_version": self.model.version}
            save_checkpoint(self.cfg.output_dir / "checkpoint_last.pt", inner, meta)
            if wanted and not refusal:
                self.stats["published"] = publish(self.cfg.publish_path, inner, self.model.name, meta)
                logger.info("published %s (validation Dice %.4f, epoch %d)", self.stats["published"]["version"],
                            dice, epoch)
        if wanted and not refusal:
            self._best = dice
        self.write()

    def finish(self, status: str, checksums: list[str] | None = None) -> dict[str, Any]:
        self.stats["status"] = status
        self.stats["total_time"] = str(timedelta(seconds=int(time.time() - self.start)))
        if checksums is not None:
            self.stats["rank_checksums"] = checksums
        self.write()
        return self.stats

    def write(self) -> None:
        if not self.ctx.main:
            return
        self.stats["current_time"] = str(timedelta(seconds=int(time.time() - self.start)))
        write_json(self.cfg.stats_path, self.stats)
        try:
            plot_curves(self.stats, self.cfg.stats_path.with_suffix(".png"))
        except Exception:  # a plot is a convenience: never fail a run for it
            logger.exception("could not draw the training curves")


def _loss(output: dict) -> float:
    """The batch loss from the trainer's output (one dict per batch: decollate=False)."""
    return float(output["loss"].detach())


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def plot_curves(stats: dict, path: Path) -> None:
    """Train loss and validation Dice per epoch (the starting weights' Dice at epoch 0), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = stats["history"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], "o-")
    left.set_xlabel("epoch")
    left.set_ylabel("train loss (Dice + BCE + IoU)")
    points = [(h["epoch"], h["val_dice"]) for h in history if h["val_dice"] is not None]
    if stats.get("baseline_val_dice") is not None:
        points.insert(0, (0, stats["baseline_val_dice"]))
    if points:
        right.plot(*zip(*points), "o-", color="tab:green")
    right.set_xlabel("epoch (0: starting weights)")
    right.set_ylabel("validation Dice")
    fig.suptitle(f"{stats['model']} fine-tuning, run {stats['run_id']}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


def _loader(dataset: SliceDataset, cfg: TrainConfig, ctx: Distributed, train: bool) -> DataLoader:
    from monai.data import DistributedSampler

    sampler = None
    if ctx.enabled:
        sampler = DistributedSampler(dataset, even_divisible=train, num_replicas=ctx.world_size, rank=ctx.rank,
                                     shuffle=train, seed=cfg.seed)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)


def near(objects: Sequence[SliceSample], gap: int = 1) -> set[tuple[int, int, int]]:
    """(case, slice, value) of each object and of the same label value up to `gap` slices away."""
    return {(s.case, s.slice + d, v) for s in objects for v in s.values for d in range(-gap, gap + 1)}


def spread_by_value(objects: Sequence[SliceSample], limit: int) -> list[SliceSample]:
    """At most `limit` objects (one value each), shared evenly among the label values and spread
    through each value's slices (the middle of each of equal parts): a few objects cover every organ."""
    by_value: dict[int, list[SliceSample]] = {}
    for s in objects:
        by_value.setdefault(s.values[0], []).append(s)
    shares = dict.fromkeys(by_value, 0)
    left = min(limit, len(objects))
    while left:
        for value in shares:
            if left and shares[value] < len(by_value[value]):
                shares[value] += 1
                left -= 1
    return [group[int((j + 0.5) * len(group) / shares[value])]  # the middle of each of `share` equal parts
            for value, group in by_value.items() for j in range(shares[value])]


def plan_samples(cfg: TrainConfig, cases: Sequence[Case], train_samples: Sequence[SliceSample] | None = None,
                 val_samples: Sequence[SliceSample] | None = None,
                 anchor_samples: Sequence[SliceSample] = ()) -> tuple[list[SliceSample], list[SliceSample],
                                                                      list[SliceSample], list[SliceSample]]:
    """The training slices, the validation objects (one per label value and slice), the anchor
    objects and the replayed objects of a run; input errors (nothing to train or validate on) are
    raised here.

    Replay: `replay` x (training slices) objects of `anchor_samples` that are not anchors, shared
    evenly among their label values and spread through each one's slices, join the training set
    with their labels as targets, so the decoder keeps seeing what it is not fine-tuned on. None
    is a validation or anchor object, nor the same label value on a slice next to one (neighbours
    look alike): the gate scores those unseen."""
    if train_samples is None:
        samples = index_slices(cases)
        train_samples, val_samples = split_samples(samples, cfg.val_split, cfg.seed, cfg.val_block)
    train_samples = spread(train_samples, cfg.max_train_slices)
    val_objects = per_object(spread(val_samples or [], cfg.max_val_slices))
    candidates = per_object(anchor_samples)
    anchors = spread(candidates, cfg.max_anchor_objects) if cfg.max_anchor_objects else []
    held = near([*val_objects, *anchors])
    pool = [s for s in candidates if (s.case, s.slice, s.values[0]) not in held]
    replay = spread_by_value(pool, max(1, round(cfg.replay * len(train_samples)))) if cfg.replay else []
    if not train_samples:
        raise EngineInputError("no labelled slices to train on: save some final labels first")
    if not val_objects:
        raise EngineInputError("no validation slices: label more slices or raise val_split")
    return train_samples, val_objects, anchors, replay


def train(cfg: TrainConfig, cases: Sequence[Case], train_samples: Sequence[SliceSample] | None = None,
          val_samples: Sequence[SliceSample] | None = None, anchor_samples: Sequence[SliceSample] = (),
          keep_off: Collection[tuple[int, int, int]] = frozenset()) -> dict[str, Any]:
    """Fine-tune on `cases` (or the given samples); returns the run's stats (also written to
    cfg.stats_path). `anchor_samples`: objects not trained on, which must not be forgotten (the
    anchor set, and the objects replayed: see plan_samples). `keep_off`: (case, slice, value) of
    objects scored outside the run (e.g. by a benchmark), never distilled on. Under
    a process group every rank calls this with the same arguments."""
    from ignite.engine import Events
    from ignite.handlers import EarlyStopping
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import StatsHandler, TensorBoardStatsHandler, ValidationHandler
    from monai.transforms import Activationsd, AsDiscreted, Compose

    ctx, device = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    train_samples, val_objects, anchors, replay = plan_samples(cfg, cases, train_samples, val_samples,
                                                               anchor_samples)
    kept_off = near([*val_objects, *anchors]) | {(s.case, s.slice, s.values[0]) for s in replay} | set(keep_off)
    distilled = distill_objects(cases, train_samples, kept_off) if cfg.distill else {}
    cfg.output_dir.mkdir(parents=True, exist_ok=True)

    model = load_model(cfg.model, cfg.checkpoint, str(device))
    model.net.to(memory_format=torch.contiguous_format)  # inference's channels-last layout; DDP buckets want contiguous
    # a frozen encoder in eval mode gives each slice one embedding: computed once (fp32, the module as
    # trained), then reused; workers would each keep their own cache
    embedded = (cfg.encoder_lr_scale == 0 and cfg.freeze_norm_stats and cfg.embedding_cache_mb > 0
                and cfg.num_workers == 0)
    segmenter = Segmenter(model, cache=EmbeddingCache(max_bytes=cfg.embedding_cache_mb << 20) if embedded else None)
    if embedded:
        model.set_encoder("fp32-eager")
    net = PromptedSam(model.net, cfg.freeze_norm_stats, embedded).to(device)
    if cfg.encoder_lr_scale == 0:  # a frozen image encoder: only the mask decoder learns
        for p in net.net.image_encoder.parameters():
            p.requires_grad_(False)
    trained: nn.Module = Distilled(net) if distilled else net  # nothing to distill on: no teacher
    if ctx.enabled:
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    encoder = {id(p) for p in net.net.image_encoder.parameters()}
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if id(p) not in encoder], "lr": cfg.lr},
        {"params": [p for p in params if id(p) in encoder], "lr": cfg.lr * cfg.encoder_lr_scale},
    ], lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = autocast_dtype(cfg.precision, device, native_bf16())
    amp = dtype is not None
    amp_kwargs = {"dtype": dtype} if amp else None

    names = [f"label {v}" for v in sorted({s.values[0] for s in val_objects})]
    groups = [names.index(f"label {s.values[0]}") for s in val_objects]
    if anchors:
        names.append(ANCHOR)
        groups += [len(names) - 1] * len(anchors)
    train_ds = SliceDataset(cases, [*train_samples, *replay], segmenter, train=True, jitter=cfg.jitter,
                            seed=cfg.seed + ctx.rank, distill=distilled or None, loose=cfg.loose_boxes, embed=embedded)
    val_ds = SliceDataset(cases, [*val_objects, *anchors], segmenter, train=False, groups=groups, embed=embedded)
    events_dir = str(cfg.output_dir / "events")
    info = {"device": str(device), "autocast": str(dtype).replace("torch.", "") if dtype else None,
            "train_slices": len(train_samples), "val_slices": len({(s.case, s.slice) for s in val_objects}),
            "val_objects": len(val_objects), "anchor_objects": len(anchors), "replay_objects": len(replay),
            "distill_objects": sum(len(v) for v in distilled.values()), "embeddings_reused": embedded,
            "trainable_parameters": sum(p.numel() for p in params)}

    group_dice = GroupDice(names, device)
    val_handlers: list[Any] = [group_dice]  # first: the handlers after it (logs, early stopping, publishing) read its score
    if ctx.main:
        val_handlers += [StatsHandler(output_transform=lambda x: None, iteration_log=False),
                        TensorBoardStatsHandler(log_dir=events_dir, output_transform=lambda x: None,
                                                iteration_log=False)]
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=_loader(val_ds, cfg, ctx, train=False), network=net,
        prepare_batch=prepare_batch, inferer=_LogitsInferer(),
        postprocessing=Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]),
        val_handlers=val_handlers, amp=amp, amp_kwargs=amp_kwargs,
    )
    recorder = RunRecorder(cfg, ctx, model, net, info, group_dice, device)
    train_handlers: list[Any] = []
    if ctx.main:
        train_handlers += [StatsHandler(tag_name="train_loss", output_transform=_loss),
                           TensorBoardStatsHandler(log_dir=events_dir, tag_name="train_loss", output_transform=_loss)]
    trainer = SupervisedTrainer(
        device=device, max_epochs=cfg.max_epochs, train_data_loader=_loader(train_ds, cfg, ctx, train=True),
        network=trained, optimizer=optimizer, loss_function=SegmentationLoss(cfg.iou_loss_weight, cfg.distill),
        prepare_batch=prepare_batch, amp=amp, amp_kwargs=amp_kwargs, decollate=False,
        train_handlers=train_handlers,
    )
    recorder.attach(trainer, evaluator)  # before validation runs on EPOCH_COMPLETED
    ValidationHandler(interval=1, validator=evaluator, epoch_level=True, exec_at_start=True).attach(trainer)
    if cfg.early_stop_patience > 0:  # the starting weights' score counts: no gain in `patience` epochs stops
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, EarlyStopping(
            patience=cfg.early_stop_patience, score_function=lambda engine: engine.state.metrics["val_dice"],
            trainer=trainer))

    logger.info("rank %d/%d on %s: %d training slices, %d replayed objects, %d validation objects, %d anchor objects, "
                "start weights %s", ctx.rank, ctx.world_size, device, len(train_samples), len(replay), len(val_objects),
                len(anchors), model.version)
    try:
        trainer.run()
    except BaseException:
        recorder.finish("failed")
        raise
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    checksum = weights_checksum(net.net)  # the SAM module, as a published file loads
    checksums = [checksum]
    if ctx.enabled:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, checksum)
        checksums = gathered
    stopped_early = trainer.state.epoch < cfg.max_epochs
    stats = recorder.finish("stopped_early" if stopped_early else "done", checksums)
    if ctx.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return stats


def train_datastore(root: str | Path, cfg: TrainConfig, organs: Sequence[str] = (),
                    val_images: Sequence[str] = ()) -> dict[str, Any]:
    """`main.py train`: fine-tune on a MONAI Label local datastore's final labels.

    `organs` (names from labels.json) restricts the objects trained and validated on; the other
    labelled objects are the anchor set (they must not be forgotten). `val_images` holds whole
    images back for validation instead of blocks of slices.
    """
    cases = list_cases(root)
    if not cases:
        raise EngineInputError(f"no labelled images in {root}")
    values = None
    anchors: list[SliceSample] = []
    if organs:
        names = label_names(root)
        values = {image: {v for v, name in by_value.items() if name in set(organs)} for image, by_value in names.items()}
        values = {image: found for image, found in values.items() if found}
        if not values:
            raise EngineInputError(f"no image in {root} has a label named {', '.join(organs)} (see labels.json)")
        others = {image: set(by_value) - values.get(image, set()) for image, by_value in names.items()}
        anchors = index_slices(cases, {image: found for image, found in others.items() if found})
    samples = index_slices(cases, values)
    if val_images:
        unknown = set(val_images) - {c.image_id for c in cases}
        if unknown:
            raise EngineInputError(f"validation images not in the datastore: {', '.join(sorted(unknown))}")
        held = {i for i, c in enumerate(cases) if c.image_id in set(val_images)}
        return train(cfg, cases, [s for s in samples if s.case not in held], [s for s in samples if s.case in held],
                     anchors)
    train_samples, val_samples = split_samples(samples, cfg.val_split, cfg.seed, cfg.val_block)
    return train(cfg, cases, train_samples, val_samples, anchors)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Be killed (SIGKILL) when the process that started this one dies, so an orphaned rank or
    train process stops using the device and publishes nothing behind a restarted server.
    Written by hand because no installed library wraps prctl; Linux only (elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawned_worker(rank: int, world_size: int, cfg: TrainConfig, cases: Sequence[Case],
                   devices: Sequence[int] | None, parent: int, errors: Any) -> None:
    """One process of a run spawned per GPU (MONAI Label's multi_gpu): die with the parent, set
    the environment that torchrun would, then train on GPU `devices[rank]`. An input error goes
    back to the parent through `errors` (spawn passes only a traceback's text)."""
    die_with_parent(parent)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    if devices:
        cfg = dataclasses.replace(cfg, device=f"cuda:{devices[rank]}")
    try:
        train(cfg, cases)
    except EngineInputError as exc:
        errors.put(str(exc))
        raise


def train_spawned(cfg: TrainConfig, cases: Sequence[Case], devices: Sequence[int] | None = None,
                  nprocs: int | None = None) -> dict[str, Any]:
    """Train in one spawned process per GPU in `devices` (or `nprocs` CPU processes, gloo) and
    return the stats the main rank wrote; an input error in a rank is raised here as EngineInputError."""
    import torch.multiprocessing as mp

    nprocs = len(devices) if devices else (nprocs or 1)
    plan_samples(cfg, cases)  # input errors before any process starts
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(spawned_worker, nprocs=nprocs, args=(nprocs, cfg, cases, list(devices or []), os.getpid(), errors))
    except mp.ProcessRaisedException:
        if not errors.empty():
            raise EngineInputError(errors.get()) from None
        raise
    return read_json(cfg.stats_path, {})
