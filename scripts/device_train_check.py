"""GPU check of fine-tuning: one epoch of bf16 training on the sample data on the GPU, then the same
under `torchrun --nproc_per_node 1` with the NCCL backend (a one-rank NCCL group still runs every
collective, DDP's and the validation's, on the device). Prints one JSON object with steps/s,
samples/s and peak GPU memory per run; with --json also writes it there.

    python scripts/device_train_check.py [--json $OUT/train_check.json] [--max-train-slices 128]

Made for the GPU machine, which has neither SimpleITK nor monailabel: when SimpleITK is missing,
images are read with nibabel (the engine's reader is replaced for this process only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
DATASTORE = ROOT / "sample-datasets" / "totalseg"


def _nibabel_reader(force: bool = False) -> None:
    """Without SimpleITK (or with `force`): let the engine import, and read NIfTI volumes with nibabel."""
    try:
        if force:
            raise ImportError("nibabel asked for")
        import SimpleITK  # noqa: F401
        return
    except ImportError:
        sys.modules["SimpleITK"] = types.ModuleType("SimpleITK")  # imported at the top of imageio, unused here
    import nibabel as nib
    import numpy as np

    from medsam_engine import dataset
    from medsam_engine.imageio import Volume

    def read(path: str | Path, key: str | None = None) -> Volume:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj).T  # (x, y, z) on disk -> (z, y, x) as SimpleITK gives
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
        stat = Path(path).stat()
        return Volume(array=np.ascontiguousarray(array), spacing=zooms[::-1], reference=None,  # type: ignore[arg-type]
                      key=key or f"{Path(path).resolve()}:{stat.st_mtime_ns}:{stat.st_size}")

    dataset.read_image = read  # type: ignore[assignment]


def run_once(out: Path, args: argparse.Namespace) -> dict:
    """One training run on the GPU; its figures."""
    _nibabel_reader(args.nibabel)
    import torch

    from medsam_engine.datastore import list_cases
    from medsam_engine.training import TrainConfig, native_bf16, train

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(output_dir=out, publish_path=out / "model" / "medsam-lite.pt", device=args.device, max_epochs=1,
                      batch_size=args.batch_size, max_train_slices=args.max_train_slices,
                      max_val_slices=args.max_val_slices, precision="bf16", publish_mode="never",
                      early_stop_patience=0)
    start = time.perf_counter()
    stats = train(cfg, list_cases(DATASTORE))
    wall = time.perf_counter() - start
    epoch = stats["history"][0]
    return {
        "status": stats["status"], "world_size": stats["world_size"], "device": stats["device"],
        "gpu": torch.cuda.get_device_name() if cuda else None, "bf16_native": native_bf16(),
        "autocast": stats["autocast"],
        "backend": ("nccl" if cuda else "gloo") if "TORCHELASTIC_RUN_ID" in os.environ else None,
        "train_slices": stats["train_slices"], "batch_size": cfg.batch_size, "steps": epoch["steps"],
        "samples": epoch["samples"], "train_seconds": epoch["train_seconds"],
        "steps_per_s": round(epoch["steps"] / epoch["train_seconds"], 2),
        "samples_per_s": round(epoch["samples"] / epoch["train_seconds"], 2),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "train_loss": round(epoch["train_loss"], 4), "val_dice": {"start": stats["baseline_val_dice"],
                                                                   "after": epoch["val_dice"]},
        "run_seconds": round(wall, 1), "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-train-slices", type=int, default=128)
    parser.add_argument("--max-val-slices", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu only to try the script itself")
    parser.add_argument("--nibabel", action="store_true", help="read images with nibabel even with SimpleITK")
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)  # the torchrun child: where to write
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(2)
    if args.rank_out:  # inside torchrun
        figures = run_once(args.rank_out.parent / "run", args)
        if int(os.environ.get("RANK", "0")) == 0:
            args.rank_out.write_text(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        summary: dict = {"single_process": run_once(work / "single", args)}
        rank_out = work / "torchrun" / "figures.json"
        rank_out.parent.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(Path(__file__).resolve()), "--rank-out", str(rank_out), "--batch-size", str(args.batch_size),
                   "--max-train-slices", str(args.max_train_slices), "--max-val-slices", str(args.max_val_slices),
                   "--device", args.device] + (["--nibabel"] if args.nibabel else [])
        run = subprocess.run(command, capture_output=True, text=True, timeout=540)
        if run.returncode == 0 and rank_out.is_file():
            summary["torchrun_nccl_1"] = json.loads(rank_out.read_text())
        else:
            summary["torchrun_nccl_1"] = {"error": f"exit {run.returncode}", "log": (run.stdout + run.stderr)[-3000:]}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
