"""Loaded images, kept per path so a second box on an open image does not read it again."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import SimpleITK as sitk
from medsam_engine import EngineInputError
from medsam_engine.imageio import Volume, read_image, volume_from_sitk


def _signature(path: Path) -> str:
    """Path, modification time and size: a changed file is read again (and gets new embeddings)."""
    stat = path.stat()
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"


def _read_dicom_series(path: Path, key: str) -> Volume:
    """A directory of DICOM files (how MONAI Label hands over a DICOMweb series when not converted)."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(path))
    if not files:
        raise EngineInputError(f"image directory {path.name} holds no DICOM series")
    reader.SetFileNames(files)
    try:
        return volume_from_sitk(reader.Execute(), key)
    except RuntimeError as exc:
        raise EngineInputError(f"cannot read DICOM series {path.name}: {str(exc).strip().splitlines()[-1]}") from None


class VolumeCache:
    """A small LRU of loaded volumes, keyed by file signature; concurrent loads of one path run once."""

    def __init__(self, max_items: int = 4) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, Volume] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, path: str | os.PathLike) -> tuple[Volume, bool]:
        """The volume at `path` and whether it was already loaded."""
        path = Path(path).resolve()
        if not path.exists():
            raise EngineInputError(f"image file not found: {path.name}")
        key = _signature(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key], True
            try:
                volume = _read_dicom_series(path, key) if path.is_dir() else read_image(path, key=key)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._items[key] = volume
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        return volume, False
