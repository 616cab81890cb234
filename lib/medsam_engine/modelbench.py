"""Encoder/decoder latency of the models on one device, without data files: for the GPU check
(`scripts/device_check.sh`), where SimpleITK and the sample data are not needed.

    python -m medsam_engine.modelbench --json out/device.json [--device cuda] [--rounds 20]

Models: LiteMedSAM with its bundled weights, and a SAM ViT-B built with segment_anything from
random weights saved to a file (timing does not depend on the weights), each with the encoders
that run on the device, timed interleaved (`timing.interleaved_ms`); on a CPU it is also the
cheap repeatability check of the encoders' ratios (no slice DSC, no 3D box: `main.py bench` has those). The input is a smooth
synthetic image: latency does not depend on what the slice shows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from statistics import median

import torch

from .encoders import ENCODERS
from .models import SamModel, build_medsam_lite, build_sam_vit
from .timing import interleaved_ms


def random_vit_b(path: Path) -> Path:
    """A SAM ViT-B (segment_anything's registry layout) with random weights, saved as a state dict."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


def synthetic_image(size: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: concentric rings, so no stage sees a constant input."""
    axis = torch.linspace(-1, 1, size)
    radius = (axis[None, :] ** 2 + axis[:, None] ** 2).sqrt()
    return (0.5 + 0.5 * torch.cos(12 * radius)).expand(1, 3, size, size).contiguous()


def bench_model(sam: SamModel, encoders: list[str], rounds: int) -> dict:
    """Per encoder: first encode (s), encode ms p50 with the encoders timed interleaved (one encode
    of each and one decode per round), ratio to the first encoder's, slices/s (an encode and a
    one-box decode), peak GPU MB of the first encode, and the embedding's mean relative deviation
    from the first encoder's."""
    image = synthetic_image(sam.geometry.size).to(sam.device)
    size = sam.geometry.size
    box = torch.tensor([[size * 0.3, size * 0.3, size * 0.7, size * 0.75]])
    out: dict[str, dict] = {}
    reference = None
    for name in encoders:
        sam.set_encoder(name)
        if sam.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(sam.device)
        start = time.perf_counter()
        embedding = sam.encode(image).float()
        if sam.device.type == "cuda":
            torch.cuda.synchronize(sam.device)
        figures = {"backend": sam.encoder_variant, "first_encode_s": round(time.perf_counter() - start, 2)}
        if sam.device.type == "cuda":
            figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(sam.device) / 2**20, 1)
        reference = embedding if reference is None else reference
        figures["embedding_rel_dev"] = float(((embedding - reference).abs().mean() / reference.abs().mean()).item())
        out[name] = figures
    calls = {name: partial(_encode_with, sam, name, image) for name in encoders}
    calls["decode"] = lambda: sam.decode(reference, box)
    times = interleaved_ms(calls, rounds, sam.device)
    decode = median(times["decode"])
    base = median(times[encoders[0]])
    for name in encoders:
        encode = median(times[name])
        out[name].update({"encode_ms_p50": round(encode, 2), "ratio": round(encode / base, 3),
                          "decode_ms_p50": round(decode, 2), "slices_per_s": round(1000 / (encode + decode), 2)})
    return out


def _encode_with(sam: SamModel, name: str, image: torch.Tensor) -> torch.Tensor:
    sam.set_encoder(name)
    return sam.encode(image)


def run_model_bench(json_path: str | Path | None, device: str | None = None, rounds: int = 20,
                    models: tuple[str, ...] = ("medsam-lite", "vit-b"), encoders: tuple[str, ...] | None = None) -> dict:
    """Bench every model in `models` on `device` (default: CUDA when there) with `encoders` (default:
    fp32 and bf16 eager on a GPU, every backend on a CPU), the first one the ratios' reference."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoders = list(encoders or (ENCODERS if device == "cpu" else ("fp32-eager", "bf16-eager")))
    results: dict[str, object] = {
        "device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "rounds": rounds,
    }
    results["encoders"] = encoders
    for name in models:
        start = time.perf_counter()
        try:
            if name == "medsam-lite":
                sam = build_medsam_lite(device=device)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    sam = build_sam_vit(random_vit_b(Path(tmp) / "vit_b_random.pth"), name="vit-b-random", device=device)
            load_s = round(time.perf_counter() - start, 2)
            results[name] = {"load_s": load_s, "input_size": sam.geometry.size,
                             "encoders": bench_model(sam, encoders, rounds)}
        except Exception as exc:  # noqa: BLE001 - one model failing must not hide the other's figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            sam = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--models", default="medsam-lite,vit-b")
    parser.add_argument("--encoders", help="comma-separated, the first the reference (default: fp32-eager first)")
    args = parser.parse_args()
    run_model_bench(args.json, args.device, args.rounds, tuple(args.models.split(",")),
                    tuple(args.encoders.split(",")) if args.encoders else None)


if __name__ == "__main__":
    main()
