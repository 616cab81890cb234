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
- ids and tags are held to `ids.py` wherever they become paths (every caller: routes, strategies,
  scoring, training): a path is `InvalidId`, and a file that links out of the folder is neither
  listed nor served;
- a saved label is checked against its image (`seg.read_label`) and stored as NIfTI, as the
  DICOMweb datastore does (dicomweb.py): a bad one is `LabelRejected`, and nothing is stored;
- at start, temporaries left by a killed writer are deleted, and a JSON nobody can read (left by
  a crash under MONAI Label's own datastore) is set aside and rebuilt from the files.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import resource
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import SimpleITK as sitk
from filelock import FileLock
from medsam_engine.atomicio import atomic_write, remove_stale_temps, staged

from lib.datastore.errors import ImageExists, ImageNotFound, InvalidId, StorageError
from lib.datastore.ids import check_name, inside
from lib.datastore.seg import read_label
from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

__all__ = ["AtomicLocalDatastore", "ImageExists", "StorageError", "local_datastore"]
from monailabel.utils.others.generic import remove_file

logger = logging.getLogger(__name__)


def _write_model(model: LocalDatastoreModel, path: Path) -> None:
    """The datastore JSON as MONAI Label writes it."""
    path.write_text(json.dumps(model.model_dump(exclude={"base_path"}), indent=2, default=str))


def write_nifti(image: sitk.Image, path: Path) -> None:
    """`image` as a gzipped NIfTI at `path`, read back whole: else OSError with the likely reason.
    (SimpleITK's NIfTI writer prints an error and returns when the disk refuses a write, leaving a
    short file and no errno.)"""
    sitk.WriteImage(image, str(path), True)
    expected = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    try:
        with gzip.open(path) as f:
            written = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
    except (OSError, EOFError):
        written = -1
    if written < expected:
        raise _short_write(path)


def _short_write(path: Path) -> OSError:
    """Why a file came out short: the disk is full (ENOSPC), the process may not write files so
    large (RLIMIT_FSIZE: EFBIG), or unknown (EIO)."""
    disk = os.statvfs(path.parent)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if disk.f_bavail * disk.f_frsize < (64 << 10):
        code = errno.ENOSPC
    elif limit != resource.RLIM_INFINITY and os.path.getsize(path) >= limit:
        code = errno.EFBIG
    else:
        return OSError(errno.EIO, "the file was written short")
    return OSError(code, os.strerror(code))


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

    def get_image_uri(self, image_id: str) -> str:
        """The image's file, "" for an id the datastore does not list; InvalidId for a path or a file
        outside the datastore (a link out of it)."""
        obj = self._datastore.objects.get(check_name(image_id, "image id"))
        return self._inside(self._datastore.image_path(), self._filename(image_id, obj.image.ext), image_id) if obj else ""

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        AtomicLocalDatastore.get_image_uri(self, image_id)  # the rule, without a DICOMweb download
        return super().get_image_info(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        label = self._datastore.label(check_name(label_id, "label id"), check_name(label_tag, "tag"))
        return self._inside(self._datastore.label_path(label_tag), self._filename(label_id, label.ext),
                            label_id) if label else ""

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        self.get_label_uri(label_id, label_tag)
        return super().get_label_info(label_id, label_tag)

    def datalist(self, full_path: bool = True) -> List[Dict[str, Any]]:
        """MONAI Label's training list, without pairs whose image or label lies outside the datastore."""
        root = os.path.realpath(self._datastore_path) + os.sep
        pairs = super().datalist(full_path=True)
        kept = [p for p in pairs if p["image"].startswith(root) and p["label"].startswith(root)]
        if not full_path:
            kept = [{k: v[len(root):] for k, v in p.items()} for p in kept]
        return kept

    def _inside(self, folder: str, name: str, what: str) -> str:
        return inside(self._datastore_path, os.path.join(folder, name), repr(what))

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any], *,
                  replace: bool = True) -> str:
        """Store the image under `image_id` (its file name's stem when empty); with `replace=False`
        raise `ImageExists` when that id is listed or its file is there (checked under the lock)."""
        file_id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name(image_id or file_id, "image id")
        name = self._filename(image_id, image_ext)
        logger.info(f"Adding Image: {image_id} => {image_filename}")
        info = {**(image_info or {}), "ts": int(time.time()), "name": name}
        with self._locked():
            self._init_from_datastore_file()
            model = self._datastore.model_copy(deep=True)
            target = self._inside(model.image_path(), name, image_id)
            previous = model.objects.get(image_id)
            if not replace and (previous is not None or os.path.exists(target)):
                raise ImageExists(f"image {image_id!r} exists: remove it first or pick another id")
            labels = previous.labels if previous is not None else {}
            model.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext), labels=labels)
            self._commit(model, lambda copy: shutil.copyfile(image_filename, copy), target, f"image {name}")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """Check the label file against its image (`seg.read_label`: readable, on the image's grid,
        whole numbers 0..65535, not empty: else LabelRejected) and store it as NIfTI."""
        uri = self.get_image_uri(image_id)
        check_name(label_tag, "tag")
        if not uri:
            raise ImageNotFound(f"unknown image id {image_id!r}: not in this server's datastore")
        return self.store_label(image_id, read_label(label_filename, sitk.ReadImage(uri)), label_tag, label_info)

    def store_label(self, image_id: str, label: sitk.Image, label_tag: str, label_info: Dict[str, Any]) -> str:
        """Store a label image already checked against its image as `<image_id>.nii.gz` under the tag."""
        logger.info(f"Saving Label for Image: {image_id}; Tag: {label_tag}; Info: {label_info}")
        label_ext = ".nii.gz"
        name = self._filename(check_name(image_id, "image id"), label_ext)
        info = {**(label_info or {}), "ts": int(time.time()), "name": name}
        with self._locked():
            self._init_from_datastore_file()
            model = self._datastore.model_copy(deep=True)
            obj = model.objects.get(image_id)
            if obj is None:
                raise ImageNotFound(f"unknown image id {image_id!r}: not in this server's datastore")
            label_dir = model.label_path(check_name(label_tag, "tag"))
            target = self._inside(label_dir, name, image_id)
            previous = obj.labels.get(label_tag)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._commit(model, lambda copy: write_nifti(label, copy), target, f"label {name}")
            if previous is not None and previous.ext != label_ext:  # the same label under its former extension
                remove_file(os.path.join(label_dir, self._filename(image_id, previous.ext)))
        return image_id

    def remove_image(self, image_id: str) -> None:
        AtomicLocalDatastore.get_image_uri(self, image_id)
        super().remove_image(image_id)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_name(image_id, "image id")

        def change(model: LocalDatastoreModel) -> None:
            obj = model.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)

        self._change(change, f"the info of image {image_id}")

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_name(label_id, "label id"), check_name(label_tag, "tag")

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

    def _commit(self, model: LocalDatastoreModel, write: Callable[[Path], object], target: str, what: str) -> None:
        """Write the new `target` file (`write(path)`) and `model` as the datastore JSON, both in full
        before either is renamed into place; then `model` is the listing. Call with the lock held."""
        placed = False
        try:
            with staged(self._datastore_config_path) as config:
                with staged(target) as copy:
                    write(copy)
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
            if not os.path.exists(os.path.join(image_dir, self._filename(image_id, obj.image.ext))):  # or links nowhere
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
            if not self._lists(image_dir, name):
                continue
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
                if not self._lists(model.label_path(tag), name):
                    continue
                obj = model.objects.get(label_id)
                if obj is not None and tag not in obj.labels:
                    logger.info(f"Adding New Label: {tag} => {label_id} => {name}")
                    obj.labels[tag] = DataModel(info=self._found(name), ext=ext)
                    changed = True
        return changed

    def _lists(self, folder: str, name: str) -> bool:
        """Whether a file found in the folder may be listed: its name is an id's, and it lies inside the
        datastore (a link out of it is left out, with a warning)."""
        try:
            check_name(self._to_id(name)[0], "file")
            inside(self._datastore_path, os.path.join(folder, name), name)
        except InvalidId as exc:
            logger.warning(f"not listed: {exc}")
            return False
        return True

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
