"""Image encoder backends: the ways a SamModel's image encoder can run, behind one call.

    fp32-eager   the torch module as built (the reference)
    bf16-eager   the torch module under bf16 autocast (the GPU default)
    fp32-traced  a TorchScript trace, frozen (batch norms folded), one per input shape
    ov-fp32      OpenVINO's CPU runtime, fp32
    ov-bf16      OpenVINO's CPU runtime with the bf16 inference-precision hint
    ov-mixed     OpenVINO's CPU runtime, LiteMedSAM's first (convolutional) stage in fp32 and the
                 rest with the bf16 hint, as two graphs run in turn (figures in the README's "Bench")
    ov-auto      the faster of ov-fp32 and ov-mixed on this machine, timed once (encoder_choice.py)

OpenVINO graphs are converted from the torch module (`openvino.convert_model`) once and kept on disk
as IR files in `encoder_cache_dir()`, named by the weights' version (which carries the checkpoint's
SHA-256), the input shape and the OpenVINO version, so a restart reads them instead of converting
again, and weights published by training (a new version) get their own. A backend that cannot be
had (OpenVINO not installed, a failed conversion) gives way to `FALLBACK` with one log line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import nn

from .atomicio import staged
from .encoder_choice import AUTO, choice_path, choose
from .stages import split_after_first_stage, tinyvit_stages
from .timing import cpu_name

logger = logging.getLogger(__name__)

ENCODERS = ("fp32-eager", "bf16-eager", "fp32-traced", "ov-fp32", "ov-bf16", "ov-mixed", AUTO)
FALLBACK = "fp32-traced"
CACHE_KEEP = 4  # converted graphs kept per model name (older versions' are deleted)


class Encoder(Protocol):
    """An encoder backend: one input (1, 3, S, S) -> its embedding, or several at once."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_many(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


def requested_encoder(name: str | None, default: str) -> str:
    """The encoder asked for: `name`, else MEDSAM_ENCODER, else the older MEDSAM_PRECISION=bf16
    (bf16-eager) / MEDSAM_GRAPH=eager|traced (fp32-eager|fp32-traced), else `default`.
    Unknown names raise ValueError."""
    name = name or os.environ.get("MEDSAM_ENCODER")
    if not name:
        precision, graph = os.environ.get("MEDSAM_PRECISION"), os.environ.get("MEDSAM_GRAPH")
        if precision == "bf16":
            name = "bf16-eager"
        elif precision not in (None, "", "fp32"):
            raise ValueError(f"MEDSAM_PRECISION must be fp32 or bf16, got {precision!r}")
        elif graph:
            if graph not in ("eager", "traced"):
                raise ValueError(f"MEDSAM_GRAPH must be eager or traced, got {graph!r}")
            name = f"fp32-{graph}"
    name = name or default
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {name!r}")
    return name


def encoder_cache_dir() -> Path:
    """Where converted graphs are kept: MEDSAM_ENCODER_CACHE, else $XDG_CACHE_HOME (~/.cache)/medsam/encoders."""
    configured = os.environ.get("MEDSAM_ENCODER_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medsam" / "encoders"


class TorchEncoder:
    """The torch module in fp32 or under bf16 autocast, eager or (fp32) as a frozen trace per shape."""

    def __init__(self, module: nn.Module, device: torch.device, precision: str = "fp32", traced: bool = False) -> None:
        self.module, self.device, self.precision, self.traced = module, device, precision, traced
        self._graphs: dict[tuple[int, ...], torch.jit.ScriptModule] = {}
        self._lock = threading.Lock()

    def prepare(self, shape: tuple[int, ...]) -> None:
        """Trace for `shape` now (a no-op when eager)."""
        if self.traced:
            self._graph(torch.zeros(shape, device=self.device))

    def _graph(self, example: torch.Tensor) -> torch.jit.ScriptModule:
        shape = tuple(example.shape)
        with self._lock:
            graph = self._graphs.get(shape)
            if graph is None:
                # TorchScript is deprecated for torch.compile, but compile took 60-190 s here and
                # ran about as fast as the frozen trace. Its shape warnings don't apply (a trace only
                # ever sees its own shape).
                with warnings.catch_warnings(), torch.inference_mode():
                    warnings.simplefilter("ignore")
                    graph = torch.jit.trace(self.module, example, check_trace=False)
                    graph = torch.jit.optimize_for_inference(torch.jit.freeze(graph))
                self._graphs[shape] = graph
        return graph

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.module(image)
        if self.traced:
            return self._graph(image)(image)
        return self.module(image)

    def encode_many(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One after another: torch already spreads one encode over all its threads."""
        return [self(image) for image in images]


class OpenVinoEncoder:
    """The module converted to OpenVINO and compiled for the CPU at one input shape.

    `source` says where the graph came from ("export": converted now and saved; "cache": read from
    disk). Calls from several threads each take their own infer request. `encode_many` runs on a
    second compilation with OpenVINO's THROUGHPUT hint (several streams of fewer threads each, made
    at its first use): on 2 cores, two one-thread encodes at once finish a volume's slices sooner
    than one two-thread encode after another (README "Bench").
    """

    def __init__(self, module: nn.Module, version: str, shape: tuple[int, ...], precision: str,
                 cache_dir: Path, threads: int | None = None) -> None:
        import openvino as ov  # ImportError when not installed: the caller falls back

        self.shape = tuple(shape)
        self.path = cache_dir / graph_file_name(version, self.shape, ov.__version__)
        core = ov.Core()
        graph = None
        if self.path.is_file() and self.path.with_suffix(".bin").is_file():
            try:
                graph = core.read_model(str(self.path))
                self.source = "cache"
            except RuntimeError as exc:  # a damaged file: convert again and replace it
                logger.warning("cached encoder graph %s unreadable (%s); converting again", self.path, exc)
        if graph is None:
            graph = self._convert(ov, module)
            self.source = "export"
        self._config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        self.compiled = core.compile_model(graph, "CPU", {**self._config, "PERFORMANCE_HINT": "LATENCY"})
        self._idle = [self.compiled.create_infer_request()]
        self._lock = threading.Lock()
        self.graph = graph  # the OpenVINO model, as converted or read
        self._ov, self._core = ov, core
        self._throughput = None

    def _convert(self, ov, module: nn.Module):
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the trace's shape warnings: the graph has one shape
            graph = ov.convert_model(module, example_input=torch.zeros(self.shape), input=[self.shape])
        try:
            save_graph(ov, graph, self.path)
            logger.info("encoder converted to OpenVINO in %.1f s, saved as %s", time.perf_counter() - start, self.path)
        except OSError as exc:  # a read-only or full cache: serve the graph anyway, convert again next start
            logger.warning("encoder graph not saved to %s: %s", self.path, exc)
        return graph

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        with self._lock:
            request = self._idle.pop() if self._idle else self.compiled.create_infer_request()
        try:
            output = request.infer({0: image.detach().cpu().numpy()})[0]
            return torch.from_numpy(output.copy())  # the request reuses its output buffer
        finally:
            with self._lock:
                self._idle.append(request)

    def encode_many(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The embeddings of `images`, in order, encoded several at a time."""
        if len(images) < 2 or self._config["INFERENCE_NUM_THREADS"] < 2:
            return [self(image) for image in images]
        with self._lock:
            if self._throughput is None:
                self._throughput = self._core.compile_model(self.graph, "CPU",
                                                            {**self._config, "PERFORMANCE_HINT": "THROUGHPUT"})
            compiled = self._throughput
        queue = self._ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        out: list[torch.Tensor | None] = [None] * len(images)

        def keep(request, i: int) -> None:
            out[i] = torch.from_numpy(request.get_output_tensor(0).data.copy())

        queue.set_callback(keep)
        for i, image in enumerate(images):
            queue.start_async({0: image.detach().cpu().numpy()}, i)
        queue.wait_all()
        return out  # type: ignore[return-value]


class MixedOpenVinoEncoder:
    """LiteMedSAM's encoder in OpenVINO with its first stage in fp32 and the rest with the bf16 hint.

    Two graphs, each an `OpenVinoEncoder` kept on disk under the weights' version with `.head` or
    `.tail` after the model's name, run one after the other: OpenVINO's CPU plugin has no fp32 per
    operation under the bf16 hint. On the sample data's MR the first stage in bf16 moves the masks,
    the later stages do not (README "Bench"). ValueError for an encoder that is not TinyViT.
    """

    def __init__(self, module: nn.Module, version: str, shape: tuple[int, ...], cache_dir: Path,
                 threads: int | None = None) -> None:
        head, tail = split_after_first_stage(module)
        self.head = OpenVinoEncoder(head, _part(version, "head"), shape, "fp32", cache_dir, threads)
        middle = tuple(int(d) for d in self.head.compiled.output(0).get_shape())
        self.tail = OpenVinoEncoder(tail, _part(version, "tail"), middle, "bf16", cache_dir, threads)
        self.source = "cache" if self.head.source == self.tail.source == "cache" else "export"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(image))

    def encode_many(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.tail.encode_many(self.head.encode_many(images))


def _part(version: str, part: str) -> str:
    """The version of a part of a model's graph: "name.part@hash" (its graphs are pruned apart)."""
    name, at, rest = version.partition("@")
    return f"{name}.{part}{at}{rest}"


def graph_file_name(version: str, shape: tuple[int, ...], ov_version: str) -> str:
    """IR file name for weights `version` ("name@sha12"), input shape and OpenVINO version."""
    ov_tag = ov_version.split("-")[0]
    return f"{version.replace('@', '-')}_{'x'.join(map(str, shape))}_ov{ov_tag}.xml"


def save_graph(ov, graph, path: Path) -> None:
    """Write the IR pair atomically: the .bin is renamed into place before the .xml, so a reader
    that finds the .xml finds its whole .bin; then prune the model's older graphs."""
    with staged(path) as xml_tmp, staged(path.with_suffix(".bin")) as bin_tmp:
        ov.save_model(graph, str(xml_tmp), compress_to_fp16=False)
        os.replace(xml_tmp.with_suffix(".bin"), bin_tmp)
    prune_graphs(path)


def prune_graphs(path: Path, keep: int = CACHE_KEEP) -> list[Path]:
    """Delete all but the `keep` newest graphs of the model `path` belongs to; return the deleted .xml paths."""
    model_name = path.name.rsplit("-", 1)[0]
    graphs = sorted((p for p in path.parent.glob(f"{model_name}-*.xml") if p.name.rsplit("-", 1)[0] == model_name),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in graphs[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".bin").unlink(missing_ok=True)
    return graphs[keep:]


def _openvino(name: str, module: nn.Module, version: str, shape: tuple[int, ...], cache_dir: Path) -> Encoder:
    """The OpenVINO backend `name` (ov-fp32, ov-bf16 or ov-mixed); raises when it cannot be had."""
    if name == "ov-mixed":
        return MixedOpenVinoEncoder(module, version, shape, cache_dir)
    return OpenVinoEncoder(module, version, shape, name.removeprefix("ov-"), cache_dir)


def auto_candidates(module: nn.Module) -> list[str]:
    """What `ov-auto` chooses among for `module`: ov-fp32, and ov-mixed for a TinyViT encoder."""
    try:
        tinyvit_stages(module)
    except ValueError:
        return ["ov-fp32"]
    return ["ov-fp32", "ov-mixed"]


def build_encoder(name: str, module: nn.Module, device: torch.device, version: str, shape: tuple[int, ...],
                  cache_dir: Path | None = None) -> tuple[str, Encoder]:
    """The backend `name` for `module`, ready for inputs of `shape`, as (name actually used, encoder):
    for `ov-auto`, the candidate it chose.

    An OpenVINO backend that cannot be had gives FALLBACK, logged once."""
    if name.startswith("ov-"):
        try:
            if device.type != "cpu":
                raise RuntimeError(f"OpenVINO backends run on the CPU, not {device}")
            cache_dir = cache_dir or encoder_cache_dir()
            if name == AUTO:
                import openvino as ov  # ImportError when not installed: fall back

                candidates = auto_candidates(module)
                if len(candidates) == 1:
                    return candidates[0], _openvino(candidates[0], module, version, shape, cache_dir)
                record = choice_path(cache_dir, version, shape, ov.__version__)
                machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
                return choose(lambda n: _openvino(n, module, version, shape, cache_dir), candidates, shape,
                              record, machine)  # type: ignore[return-value]
            return name, _openvino(name, module, version, shape, cache_dir)
        except Exception as exc:  # noqa: BLE001 - ImportError, conversion or compile errors of any type
            logger.warning("encoder %s unavailable (%s: %s); using %s", name, type(exc).__name__,
                           str(exc).splitlines()[0] if str(exc) else "", FALLBACK)
            name = FALLBACK
    precision, graph = name.split("-")
    encoder = TorchEncoder(module, device, precision, traced=graph == "traced")
    encoder.prepare(shape)
    return name, encoder
