"""Fine-tune MedSAM from labelled volumes, as the paper did: image encoder and mask decoder trained,
prompt encoder frozen, Dice + BCE loss, AdamW, boxes from the label's objects jittered by 0-20 px.

One code path for one process, MONAI Label's `multi_gpu` (processes spawned by the app) and
`torchrun` (any number of nodes): the process group comes from the environment (RANK, WORLD_SIZE,
MASTER_ADDR, ...), NCCL on GPUs and gloo on CPUs. The loop is MONAI's SupervisedTrainer and
SupervisedEvaluator (ignite), with the evaluator run on held-back slices before the first epoch
(the starting weights' score) and after each one. The best epoch is published atomically where the
server's infer task reloads it (see checkpoints.py); a run that fails or is killed publishes nothing
more, so the served weights stay as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .atomicio import atomic_write
from .checkpoints import publish, save_checkpoint, write_json
from .datastore import Case, label_names, list_cases
from .dataset import SliceDataset, SliceSample, index_slices, split_samples, spread
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
    weight_decay: float = 0.01
    jitter: int = 20
    val_split: float = 0.2
    max_train_slices: int = 0  # 0: all
    max_val_slices: int = 0
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


class PromptedSam(nn.Module):
    """A SAM-style net as one trainable module: (images, boxes in model pixels) -> (mask logits at
    the decoder's resolution (B, 1, L, L), predicted IoU (B,)). The prompt encoder is frozen.

    Each image is decoded with its own box: segment_anything's decoder repeats one embedding per
    prompt, so a batch of images is decoded one by one (the decoder is small next to the encoder).
    """

    def __init__(self, net: nn.Module, freeze_norm_stats: bool = True) -> None:
        super().__init__()
        self.net = net
        self.freeze_norm_stats = freeze_norm_stats
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
        embeddings = self.net.image_encoder(images)
        with torch.no_grad():
            sparse, dense = self.net.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
            image_pe = self.net.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for i in range(images.shape[0]):
            low, iou = self.net.mask_decoder(image_embeddings=embeddings[i:i + 1], image_pe=image_pe,
                                             sparse_prompt_embeddings=sparse[i:i + 1],
                                             dense_prompt_embeddings=dense[i:i + 1], multimask_output=False)
            logits.append(low)
            ious.append(iou[:, 0])
        return torch.cat(logits).float(), torch.cat(ious).float()


class SegmentationLoss(nn.Module):
    """MONAI's DiceCELoss (Dice + BCE on sigmoid logits, MedSAM's loss) plus, as LiteMedSAM's
    training does, the squared error of the predicted IoU against the mask's actual IoU (keeps the
    IoU the server reports meaningful)."""

    def __init__(self, iou_weight: float = 1.0) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.seg = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.iou_weight = iou_weight

    def forward(self, pred: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        logits, iou = pred
        loss = self.seg(logits, target)
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
    """Batches for MONAI's engines: inputs, targets, and the boxes as the network's extra argument."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, non_blocking=non_blocking)

    return move(batch["image"]), move(batch["label"]), (move(batch["box"]),), {}


class _LogitsInferer:
    """Validation keeps the mask logits of PromptedSam's (logits, iou) output."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return network(inputs, *args, **kwargs)[0]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[Distributed, torch.device]:
    """The process group from the environment (torchrun, or the app's spawned workers), and this
    process's device: NCCL and cuda:LOCAL_RANK on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    if use_cuda:
        torch.cuda.set_device(local_rank if world > 1 else torch.device(device or "cuda").index or 0)
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

    def __init__(self, cfg: TrainConfig, ctx: Distributed, model: SamModel, net: PromptedSam, info: dict) -> None:
        self.cfg, self.ctx, self.model, self.net = cfg, ctx, model, net
        self.start = time.time()
        self.losses: list[float] = []
        self.stats: dict[str, Any] = {
            "status": "running", "run_id": cfg.run_id, "model": model.name, "start_version": model.version,
            "epoch": 0, "total_epochs": cfg.max_epochs, "best_metric": None, "best_metric_epoch": None,
            "baseline_val_dice": None, "published": None, "history": [], "start_ts": int(self.start),
            "world_size": ctx.world_size, "config": _plain(dataclasses.asdict(cfg)), **info,
        }
        self._best = float("-inf")

    def attach(self, trainer: Any, evaluator: Any) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: self._validated(engine, trainer))

    def _iteration(self, engine: Any) -> None:
        self.losses.append(_loss(engine.state.output))

    def _epoch(self, engine: Any) -> None:
        loss = torch.tensor([sum(self.losses), len(self.losses)], dtype=torch.float64)
        if self.ctx.enabled:
            dist.all_reduce(loss)
        self.losses = []
        self.stats["history"].append({"epoch": engine.state.epoch, "train_loss": float(loss[0] / max(loss[1], 1)),
                                      "val_dice": None, "seconds": round(time.time() - self.start, 1)})
        self.stats["epoch"] = engine.state.epoch

    def _validated(self, evaluator: Any, trainer: Any) -> None:
        dice = float(evaluator.state.metrics["val_dice"])
        epoch = trainer.state.epoch
        if epoch == 0:
            self.stats["baseline_val_dice"] = dice
            self._best = dice if self.cfg.publish_mode == "improved" else float("-inf")
            self.write()
            return
        self.stats["history"][-1]["val_dice"] = dice
        if self.ctx.main:  # MONAI Label shows the train subprocess's last log lines in GET /train/
            logger.info("epoch %d/%d: train loss %.4f, validation Dice %.4f (starting weights %.4f)", epoch,
                        self.cfg.max_epochs, self.stats["history"][-1]["train_loss"], dice,
                        self.stats["baseline_val_dice"])
        if self.stats["best_metric"] is None or dice > self.stats["best_metric"]:
            self.stats["best_metric"], self.stats["best_metric_epoch"] = dice, epoch
        if self.ctx.main:
            state = self.net.state_dict()
            inner = {k[len("net."):]: v for k, v in state.items()}
            meta = {"run_id": self.cfg.run_id, "epoch": epoch, "val_dice": dice, "start_version": self.model.version}
            save_checkpoint(self.cfg.output_dir / "checkpoint_last.pt", inner, meta)
            if dice > self._best and self.cfg.publish_path and self.cfg.publish_mode != "never":
                self._best = dice
                self.stats["published"] = publish(self.cfg.publish_path, inner, self.model.name, meta)
                logger.info("published %s (validation Dice %.4f, epoch %d)", self.stats["published"]["version"],
                            dice, epoch)
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


def train(cfg: TrainConfig, cases: Sequence[Case], train_samples: Sequence[SliceSample] | None = None,
          val_samples: Sequence[SliceSample] | None = None) -> dict[str, Any]:
    """Fine-tune on `cases` (or the given samples); returns the run's stats (also written to
    cfg.stats_path). Under a process group every rank calls this with the same arguments."""
    from ignite.engine import Events
    from ignite.handlers import EarlyStopping
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import MeanDice, StatsHandler, TensorBoardStatsHandler, ValidationHandler, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    ctx, device = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    if train_samples is None:
        samples = index_slices(cases)
        train_samples, val_samples = split_samples(samples, cfg.val_split, cfg.seed)
    train_samples = spread(train_samples, cfg.max_train_slices)
    val_samples = spread(val_samples or [], cfg.max_val_slices)
    if not train_samples:
        raise EngineInputError("no labelled slices to train on: save some final labels first")
    if not val_samples:
        raise EngineInputError("no validation slices: label more slices or raise val_split")
    cfg.output_dir.mkdir(parents=True, exist_ok=True)

    model = load_model(cfg.model, cfg.checkpoint, str(device))
    model.net.to(memory_format=torch.contiguous_format)  # inference's channels-last layout; DDP buckets want contiguous
    segmenter = Segmenter(model)
    net = PromptedSam(model.net, cfg.freeze_norm_stats).to(device)
    trained = net
    if ctx.enabled:
        trained = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = device.type == "cuda" and PRECISIONS[cfg.precision] is not None
    amp_kwargs = {"dtype": PRECISIONS[cfg.precision]} if amp else None

    train_ds = SliceDataset(cases, train_samples, segmenter, train=True, jitter=cfg.jitter, seed=cfg.seed + ctx.rank)
    val_ds = SliceDataset(cases, val_samples, segmenter, train=False)
    events_dir = str(cfg.output_dir / "events")
    info = {"device": str(device), "train_slices": len(train_samples), "val_slices": len(val_samples),
            "trainable_parameters": sum(p.numel() for p in params)}

    val_handlers = []
    if ctx.main:
        val_handlers = [StatsHandler(output_transform=lambda x: None, iteration_log=False),
                        TensorBoardStatsHandler(log_dir=events_dir, output_transform=lambda x: None,
                                                iteration_log=False)]
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=_loader(val_ds, cfg, ctx, train=False), network=net,
        prepare_batch=prepare_batch, inferer=_LogitsInferer(),
        postprocessing=Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]),
        key_val_metric={"val_dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))},
        val_handlers=val_handlers, amp=amp, amp_kwargs=amp_kwargs,
    )
    recorder = RunRecorder(cfg, ctx, model, net, info)
    train_handlers: list[Any] = []
    if ctx.main:
        train_handlers += [StatsHandler(tag_name="train_loss", output_transform=_loss),
                           TensorBoardStatsHandler(log_dir=events_dir, tag_name="train_loss", output_transform=_loss)]
    trainer = SupervisedTrainer(
        device=device, max_epochs=cfg.max_epochs, train_data_loader=_loader(train_ds, cfg, ctx, train=True),
        network=trained, optimizer=optimizer, loss_function=SegmentationLoss(cfg.iou_loss_weight),
        prepare_batch=prepare_batch, amp=amp, amp_kwargs=amp_kwargs, decollate=False,
        train_handlers=train_handlers,
    )
    recorder.attach(trainer, evaluator)  # before validation runs on EPOCH_COMPLETED
    ValidationHandler(interval=1, validator=evaluator, epoch_level=True, exec_at_start=True).attach(trainer)
    if cfg.early_stop_patience > 0:  # the starting weights' score counts: no gain in `patience` epochs stops
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, EarlyStopping(
            patience=cfg.early_stop_patience, score_function=lambda engine: engine.state.metrics["val_dice"],
            trainer=trainer))

    logger.info("rank %d/%d on %s: %d training slices, %d validation slices, start weights %s", ctx.rank,
                ctx.world_size, device, len(train_samples), len(val_samples), model.version)
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

    `organs` (names from labels.json) restricts the objects trained and validated on; `val_images`
    holds whole images back for validation instead of a random share of the slices.
    """
    cases = list_cases(root)
    if not cases:
        raise EngineInputError(f"no labelled images in {root}")
    values = None
    if organs:
        names = label_names(root)
        values = {image: {v for v, name in by_value.items() if name in set(organs)} for image, by_value in names.items()}
        values = {image: found for image, found in values.items() if found}
        if not values:
            raise EngineInputError(f"no image in {root} has a label named {', '.join(organs)} (see labels.json)")
    samples = index_slices(cases, values)
    if val_images:
        unknown = set(val_images) - {c.image_id for c in cases}
        if unknown:
            raise EngineInputError(f"validation images not in the datastore: {', '.join(sorted(unknown))}")
        held = {i for i, c in enumerate(cases) if c.image_id in set(val_images)}
        return train(cfg, cases, [s for s in samples if s.case not in held], [s for s in samples if s.case in held])
    train_samples, val_samples = split_samples(samples, cfg.val_split, cfg.seed)
    return train(cfg, cases, train_samples, val_samples)


def spawned_worker(rank: int, world_size: int, cfg: TrainConfig, cases: Sequence[Case]) -> None:
    """One process of a run spawned per GPU (MONAI Label's multi_gpu): set the environment that
    torchrun would, then train. MASTER_ADDR and MASTER_PORT come from the parent."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    train(cfg, cases)
