"""Checkpoints written atomically, and the published (served) weights with their version history.

A published file is replaced by `os.replace` of a complete temporary file in the same directory, so
a reader (the server's hot reload) sees the old file or the new one, never a partial one, and a
training killed at any point leaves the served weights as they were.

    model/medsam-lite.pt                  served weights ({"model": state_dict, "meta": {...}})
    model/medsam-lite.json                manifest: current version and history
    model/versions/medsam-lite-v0003.pt   every published version, for roll-back
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .atomicio import atomic_write
from .models import file_sha256


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write {"model": state_dict, "meta": meta} atomically (temporary file, then rename).

    Serialised in memory first: torch's file writer reports a failed write (a full disk) as
    "unexpected pos", without the reason; a plain write raises OSError naming it."""
    path = Path(path)
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    buffer = io.BytesIO()
    torch.save({"model": cpu_state, "meta": meta}, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
    return path


def write_json(path: str | Path, data: Any) -> None:
    """JSON written atomically."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")

    atomic_write(path, write)


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return default


def manifest_path(published: str | Path) -> Path:
    return Path(published).with_suffix(".json")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _entry(model_name: str, number: int, copy: Path, digest: str, published_at: float,
           meta: dict[str, Any]) -> dict[str, Any]:
    return {"version": f"{model_name}@{digest[:12]}", "number": number, "file": str(copy),
            "published_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(published_at)), **meta}


def publish(published: str | Path, state_dict: dict[str, torch.Tensor], model_name: str,
            meta: dict[str, Any], keep: int = 10) -> dict[str, Any]:
    """Publish weights as the served file (atomically), keep a numbered copy, update the manifest.

    Returns the manifest entry of the new version: {"version": "name@sha12", "number": n, ...}.
    """
    published = Path(published)
    manifest = read_json(manifest_path(published), {"history": []})
    number = max((e["number"] for e in manifest["history"]), default=0) + 1
    copy = published.parent / "versions" / f"{published.stem}-v{number:04d}.pt"
    save_checkpoint(copy, state_dict, {**meta, "number": number, "model": model_name})
    digest = file_sha256(copy)
    # The numbered copy is complete on disk; a hard link to it (or a copy) replaces the served file.
    atomic_write(published, lambda tmp: _link_or_copy(copy, tmp))
    entry = _entry(model_name, number, copy, digest, time.time(), meta)
    manifest["current"] = entry
    manifest["history"].append(entry)
    for old in manifest["history"][:-keep] if keep > 0 else []:
        Path(old["file"]).unlink(missing_ok=True)
    manifest["history"] = manifest["history"][-keep:] if keep > 0 else manifest["history"]
    write_json(manifest_path(published), manifest)
    return entry


def reconcile_manifest(published: str | Path) -> dict[str, Any] | None:
    """Make the manifest's `current` name the weights the served file holds, and return it.

    `publish` replaces the served file before it rewrites the manifest: a process killed between
    the two leaves a manifest naming the previous version. None when nothing is published; a served
    file `publish` did not write (no version number in it) leaves the manifest alone.
    """
    published = Path(published)
    if not published.is_file():
        return None
    path = manifest_path(published)
    manifest = read_json(path, {"history": []})
    digest = file_sha256(published)
    current = manifest.get("current")
    if current and current["version"].endswith(f"@{digest[:12]}"):
        return current
    entry = next((e for e in reversed(manifest["history"]) if e["version"].endswith(f"@{digest[:12]}")), None)
    if entry is None:
        meta = torch.load(published, map_location="cpu", weights_only=True).get("meta", {})
        if "number" not in meta:
            return current
        meta = dict(meta)
        number, model_name = int(meta.pop("number")), str(meta.pop("model", published.stem))
        copy = published.parent / "versions" / f"{published.stem}-v{number:04d}.pt"
        entry = _entry(model_name, number, copy, digest, published.stat().st_mtime, meta)
        manifest["history"].append(entry)
    manifest["current"] = entry
    write_json(path, manifest)
    return entry
