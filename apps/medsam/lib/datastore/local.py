"""MONAI Label's local datastore (`--studies FOLDER`), storing every file atomically.

MONAI Label's `LocalDatastore` copies a saved label over the old file in place and rewrites its
`datastore_v2.json` in place: a server killed mid-save, or a disk that fills up, leaves a
half-written label, or a truncated JSON that stops the next start. Its info updates and its
reconcile with the files (run by the file watcher on every file event) also change the listing in
place without a lock, so one racing a save is lost. Here:

- a saved label (or an added image) and the datastore JSON are both written in full under
  temporary names, then renamed into place (`medsam_engine.atomicio`): the datastore holds the
  old label or the new one, whole, and lists it;
- every change (image, label, info, name, reconcile) is made under one lock (a thread lock and the
  lock file, for other processes) on a copy of the listing, which replaces the listing once its
  JSON is written: no change is lost, and readers never see half of one;
- a failed write (a full disk, a file too large) raises `StorageError` naming the reason; the old
  label, the JSON and the listing stay as they were;
- an image is added under an id only once when asked (`replace=False`): else `ImageExists`;
- at start, temporaries left by a killed writer are deleted, and a JSON nobody can read (left by
  a crash under MONAI Label's own datastore) is set aside and rebuilt from the files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

from filelock import FileLock
from medsam_engine.atomicio import atomic_write, remove_stale_temps, staged

from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
from monailabel.utils.others.generic import remove_file

logger = logging.getLogger(__name__)


class StorageError(OSError):
    """The datastore's disk refused a write (full, read-only, file too large)."""


class ImageExists(Exception):
    """An image with this id is stored already (adding it again would replace it)."""


def _write_model(model: LocalDatastoreModel, path: Path) -> None:
    """The datastore JSON as MONAI Label writes it."""
    path.write_text(json.dumps(model.model_dump(exclude={"base_path"}), indent=2, default=str))


class AtomicLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, read_only: bool = False, **kwargs: Any) -> None:
        self._mutex = threading.RLock()  # this process's threads
        self._file_lock = FileLock(os.path.join(datastore_path, ".lock"))  # other processes (reentrant)
        if not read_only:
            for stale in remove_stale_temps(datastore_path, recursive=True):
                logger.warning("removed %s, left by a write that did not finish", stale)
        super().__init__(datastore_path, read_only=read_only, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:  # auto reload: a file renamed into place is news, as a created one is
            handler.on_moved = self._on_any_event

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the datastore against this process's other threads and other processes."""
        with self._mutex, self._file_lock:
            yield

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any], *,
                  replace: bool = True) -> str:
        """Store the image under `image_id` (its file name's stem when empty); with `replace=False`
        raise `ImageExists` when that id is listed or its file is there (checked under the lock)."""
        file_id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or file_id
        name = self._filename(image_id, image_ext)
        logger.info(f"Adding Image: {image_id} => {image_filename}")
        info = {**(image_info or {}), "ts": int(time.time()), "name": name}
        with self._locked():
            self._init_from_datastore_file()
            model = self._datastore.model_copy(deep=True)
            target = os.path.realpath(os.path.join(model.image_path(), name))
            previous = model.objects.get(image_id)
            if not replace and (previous is not None or os.path.exists(target)):
                raise ImageExists(f"image {image_id!r} exists: remove it first or pick another id")
            labels = previous.labels if previous is not None else {}
            model.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext), labels=labels)
            self._commit(model, image_filename, target, f"image {name}")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        logger.info(f"Saving Label for Image: {image_id}; Tag: {label_tag}; Info: {label_info}")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, label_ext)
        info = {**(label_info or {}), "ts": int(time.time()), "name": name}
        with self._locked():
            self._init_from_datastore_file()
            model = self._datastore.model_copy(deep=True)
            obj = model.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            label_dir = model.label_path(label_tag)
            previous = obj.labels.get(label_tag)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._commit(model, label_filename, os.path.join(label_dir, name), f"label {name}")
            if previous is not None and previous.ext != label_ext:  # the same label under its former extension
                remove_file(os.path.join(label_dir, self._filename(image_id, previous.ext)))
        return image_id

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        def change(model: LocalDatastoreModel) -> None:
            obj = model.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)

        self._change(change, f"the info of image {image_id}")

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        def change(model: LocalDatastoreModel) -> None:
            label = model.label(label_id, label_tag)
            if label is None:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)

        self._change(change, f"the info of label {label_id} ({label_tag})")

    def set_name(self, name: str) -> None:
        self._change(lambda model: setattr(model, "name", name), "the datastore's name")

    def set_description(self, description: str) -> None:
        self._change(lambda model: setattr(model, "description", description), "the datastore's description")

    def _change(self, change: Callable[[LocalDatastoreModel], None], what: str) -> None:
        """Apply `change` to a copy of the listing, write it as the JSON, then make it the listing;
        on a failed write `StorageError`, and the listing (memory and disk) stays as it was."""
        with self._locked():
            self._init_from_datastore_file()
            model = self._datastore.model_copy(deep=True)
            change(model)
            try:
                atomic_write(self._datastore_config_path, lambda tmp: _write_model(model, tmp))
            except OSError as exc:
                raise StorageError(exc.errno, f"could not store {what}: {exc.strerror or exc}; "
                                              "the datastore is as it was") from exc
            self._adopt(model)

    def _commit(self, model: LocalDatastoreModel, source: str, target: str, what: str) -> None:
        """Copy `source` to `target` and write `model` as the datastore JSON, both in full before
        either is renamed into place; then `model` is the listing. Call with the lock held."""
        placed = False
        try:
            with staged(self._datastore_config_path) as config:
                with staged(target) as copy:
                    shutil.copyfile(source, copy)
                    _write_model(model, config)
                placed = True
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if not placed:
                raise StorageError(exc.errno, f"could not store {what}: {reason}; "
                                              "the datastore keeps its previous files") from exc
            self._adopt(model)  # the new file is in place: list it
            raise StorageError(exc.errno, f"stored {what}, but could not record it in "
                                          f"{os.path.basename(self._datastore_config_path)}: {reason}; it is "
                                          "served, and after a restart its info may be lost") from exc
        self._adopt(model)

    def _adopt(self, model: LocalDatastoreModel) -> None:
        """Make `model` the listing, as of the datastore JSON on disk now. Call with the lock held."""
        model.base_path = self._datastore_path
        self._datastore = model
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _reconcile_datastore(self) -> None:
        """Make the listing match the files, as MONAI Label does but on a copy under the lock. The
        listing follows the files even when the JSON cannot be written (the next start reconciles)."""
        with self._locked():
            self._init_from_datastore_file()
            model = self._datastore.model_copy(deep=True)
            if not self._match_files(model):
                return
            try:
                atomic_write(self._datastore_config_path, lambda tmp: _write_model(model, tmp))
            except OSError as exc:
                logger.error(f"could not store the datastore's listing: {exc.strerror or exc}")
            self._adopt(model)

    def _match_files(self, model: LocalDatastoreModel) -> bool:
        """Drop from `model` the images and labels whose file is gone, add the files it does not
        list (labels only of listed images); whether anything changed."""
        image_dir = model.image_path()
        changed = False
        for image_id, obj in list(model.objects.items()):
            if not os.path.exists(os.path.join(image_dir, self._filename(image_id, obj.image.ext))):
                logger.info(f"Removing non existing Image Id: {image_id}")
                del model.objects[image_id]
                changed = True
                continue
            for tag, label in list(obj.labels.items()):
                if not os.path.exists(os.path.join(model.label_path(tag), self._filename(image_id, label.ext))):
                    logger.info(f"Removing non existing Label Id: '{image_id}' for '{tag}'")
                    del obj.labels[tag]
                    changed = True
        for name in self._list_files(image_dir, self._extensions):
            image_id, ext = self._to_id(name)
            if image_id not in model.objects:
                logger.info(f"Adding New Image: {image_id} => {name}")
                model.objects[image_id] = ImageLabelModel(image=DataModel(info=self._found(name), ext=ext))
                changed = True
        labels_dir = model.label_path(None)
        for tag in sorted(os.listdir(labels_dir)):
            if not os.path.isdir(os.path.join(labels_dir, tag)):
                continue
            for name in self._list_files(model.label_path(tag), self._extensions):
                label_id, ext = self._to_id(name)
                obj = model.objects.get(label_id)
                if obj is not None and tag not in obj.labels:
                    logger.info(f"Adding New Label: {tag} => {label_id} => {name}")
                    obj.labels[tag] = DataModel(info=self._found(name), ext=ext)
                    changed = True
        return changed

    @staticmethod
    def _found(name: str) -> Dict[str, Any]:
        """The info MONAI Label gives a file it finds in the folder."""
        return {"ts": int(time.time()), "name": name}

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Load the datastore JSON when it changed since this process last wrote or read it. At
        start (`throw_exception`) a JSON nobody can read is set aside, to be rebuilt from the files."""
        with self._locked():
            path = self._datastore_config_path
            ts = os.stat(path).st_mtime if os.path.exists(path) else self._config_ts
            if ts == self._config_ts:
                return
            try:
                model = LocalDatastoreModel.model_validate_json(Path(path).read_text())
            except ValueError as exc:
                if not throw_exception:
                    logger.error(f"datastore file unreadable ({exc}); keeping the listing in memory")
                    return
                aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(path, aside)
                logger.error(f"datastore file unreadable ({exc}); set aside as {aside}, rebuilding it from the files")
                return
            model.base_path = self._datastore_path
            self._datastore = model
            self._config_ts = ts


def local_datastore(studies: str) -> AtomicLocalDatastore:
    """The datastore for `--studies FOLDER`, with MONAI Label's settings (extensions, auto reload, read-only)."""
    return AtomicLocalDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
