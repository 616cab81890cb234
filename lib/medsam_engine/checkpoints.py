"""Checkpoints written atomically, and the published (served) weights with their version history.

A published file is replaced by `os.replace` of a complete temporary file in the same directory, so
a reader (the server's hot reload) sees the old file or the new one, never a partial one, and a
training killed at any point leaves the served weights as they were.

    model/medsam-lite.pt                  served weights ({"model": state_dict, "meta": {...}})
    model/medsam-lite.json                manifest: current version and history
    model/versions/medsam-lite-v0003.pt   every published version, for roll-back
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .models import file_sha256


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write {"model": state_dict, "meta": meta} atomically (temporary file, then rename)."""
    path = Path(path)
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: torch.save({"model": cpu_state, "meta": meta}, tmp))
    return path


def write_json(path: str | Path, data: Any) -> None:
    """JSON written atomically."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")

    _atomic_write(path, write)


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


def publish(published: str | Path, state_dict: dict[str, torch.Tensor], model_name: str,
            meta: dict[str, Any], keep: int = 10) -> dict[str, Any]:
    """Publish weights as the served file (atomically), keep a numbered copy, update the manifest.

    Returns the manifest entry of the new version: {"version": "name@sha12", "number": n, ...}.
    """
    published = Path(published)
    manifest = read_json(manifest_path(published), {"history": []})
    number = max((e["number"] for e in manifest["history"]), default=0) + 1
    versions = published.parent / "versions"
    copy = versions / f"{published.stem}-v{number:04d}.pt"
    save_checkpoint(copy, state_dict, {**meta, "number": number})
    digest = file_sha256(copy)
    os.makedirs(published.parent, exist_ok=True)
    # The numbered copy is complete on disk; a hard link or a copy of it replaces the served file.
    tmp = published.parent / f".{published.name}.{os.getpid()}.tmp"
    try:
        try:
            os.link(copy, tmp)
        except OSError:
            tmp.write_bytes(copy.read_bytes())
        os.replace(tmp, published)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {"version": f"{model_name}@{digest[:12]}", "number": number, "file": str(copy),
             "published_at": time.strftime("%Y-%m-%d %H:%M:%S"), **meta}
    manifest["current"] = entry
    manifest["history"].append(entry)
    for old in manifest["history"][:-keep] if keep > 0 else []:
        Path(old["file"]).unlink(missing_ok=True)
    manifest["history"] = manifest["history"][-keep:] if keep > 0 else manifest["history"]
    write_json(manifest_path(published), manifest)
    return entry
