"""MONAI Label's local datastore (`--studies FOLDER`), storing every file atomically.

MONAI Label's `LocalDatastore` copies a saved label over the old file in place and rewrites its
`datastore_v2.json` in place: a server killed mid-save, or a disk that fills up, leaves a
half-written label, or a truncated JSON that stops the next start. Here:

- a saved label (or an added image) and the datastore JSON are both written in full under
  temporary names, then renamed into place (`medsam_engine.atomicio`): the datastore holds the
  old label or the new one, whole, and lists it;
- a failed write (a full disk, a file too large) raises `StorageError` naming the reason; the old
  label, the JSON and the listing stay as they were;
- at start, temporaries left by a killed writer are deleted, and a JSON nobody can read (left by
  a crash under MONAI Label's own datastore) is set aside and rebuilt from the files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict

from filelock import FileLock
from medsam_engine.atomicio import atomic_write, remove_stale_temps, staged

from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.utils.others.generic import remove_file

logger = logging.getLogger(__name__)


class StorageError(OSError):
    """The datastore's disk refused a write (full, read-only, file too large); nothing was changed."""


def _write_model(model: LocalDatastoreModel, path: Path) -> None:
    """The datastore JSON as MONAI Label writes it."""
    path.write_text(json.dumps(model.model_dump(exclude={"base_path"}), indent=2, default=str))


class AtomicLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, read_only: bool = False, **kwargs: Any) -> None:
        if not read_only:
            for stale in remove_stale_temps(datastore_path, recursive=True):
                logger.warning("removed %s, left by a write that did not finish", stale)
        super().__init__(datastore_path, read_only=read_only, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:  # auto reload: a file renamed into place is news, as a created one is
            handler.on_moved = self._on_any_event

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        file_id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or file_id
        name = self._filename(image_id, image_ext)
        logger.info(f"Adding Image: {image_id} => {image_filename}")
        info = {**(image_info or {}), "ts": int(time.time()), "name": name}
        with FileLock(self._lock_file):
            model = self._datastore.model_copy(deep=True)
            model.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._commit(model, image_filename, os.path.realpath(os.path.join(model.image_path(), name)), f"image {name}")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        logger.info(f"Saving Label for Image: {image_id}; Tag: {label_tag}; Info: {label_info}")
        if image_id not in self._datastore.objects:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        info = {**(label_info or {}), "ts": int(time.time()), "name": name}
        with FileLock(self._lock_file):
            model = self._datastore.model_copy(deep=True)
            obj = model.objects.get(image_id)
            if obj is None:  # removed by another process since the check above
                raise ImageNotFoundException(f"Image {image_id} not found")
            previous = obj.labels.get(label_tag)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._commit(model, label_filename, os.path.join(label_dir, name), f"label {name}")
            if previous is not None and previous.ext != label_ext:  # the same label under its former extension
                remove_file(os.path.join(label_dir, self._filename(image_id, previous.ext)))
        return image_id

    def _commit(self, model: LocalDatastoreModel, source: str, target: str, what: str) -> None:
        """Copy `source` to `target` and write `model` as the datastore JSON, both in full before
        either is renamed into place; then `model` is the datastore's. Call with the lock held."""
        try:
            with staged(self._datastore_config_path) as config, staged(target) as copy:
                shutil.copyfile(source, copy)
                _write_model(model, config)
        except OSError as exc:
            raise StorageError(exc.errno, f"could not store {what}: {exc.strerror or exc}; "
                                          "the datastore keeps its previous files") from exc
        model.base_path = self._datastore_path
        self._datastore = model
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _update_datastore_file(self, lock: bool = True) -> None:
        with FileLock(self._lock_file) if lock else nullcontext():
            atomic_write(self._datastore_config_path, lambda tmp: _write_model(self._datastore, tmp))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        try:
            super()._init_from_datastore_file(throw_exception=throw_exception)
        except ValueError as exc:  # only at start (throw_exception): a JSON nobody can read
            aside = f"{self._datastore_config_path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(self._datastore_config_path, aside)
            logger.error(f"datastore file unreadable ({exc}); set aside as {aside}, rebuilding it from the files")


def local_datastore(studies: str) -> AtomicLocalDatastore:
    """The datastore for `--studies FOLDER`, with MONAI Label's settings (extensions, auto reload, read-only)."""
    return AtomicLocalDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
