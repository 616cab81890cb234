"""Drafts: every infer answer on a datastore image merged into that image's `original` label.

MONAI Label saves an infer result as the image's draft only when the request names an image id;
this app resolves the id to the server's file before calling `infer` (so that no id is read as a
path), and MONAI Label then turns `save_label` off. Here the infer task stores the draft itself:

- the answer's objects go into the image's draft under the value of the request's label name (its
  position in the task's labels, 1-based; else the engine's own values), replacing that value on
  the slices the answer covers and keeping the draft's other objects and slices;
- nothing is drafted for an image with a final label (the annotator's word stands, and draft
  scoring compares the model's first answer with it);
- the draft is written in full to a temporary file and stored through the datastore's
  `save_label` (which places it atomically), by one background thread after the reply (reading,
  merging and writing a 512 x 512 x 20 draft took about 0.4 s here, too long to add to each box),
  so answers are merged one at a time, in the order they came.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from medsam_engine.imageio import Volume, extension_of, label_image, read_image

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

logger = logging.getLogger(__name__)

DRAFT = DefaultLabelTag.ORIGINAL.value
FINAL = DefaultLabelTag.FINAL.value


def merge_draft(draft: np.ndarray | None, answer: np.ndarray, value: int | None) -> np.ndarray:
    """The draft with `answer` merged in: on each slice the answer covers, the voxels of its value
    (`value`, or the answer's own values when None) are replaced by the answer's; other slices and
    other values are kept. Returns a new uint16 array."""
    merged = np.zeros(answer.shape, np.uint16) if draft is None else draft.astype(np.uint16, copy=True)
    if merged.shape != answer.shape:
        raise ValueError(f"draft shape {merged.shape} != answer shape {answer.shape}")
    covered = answer.reshape(answer.shape[0], -1).any(axis=1)
    values = [value] if value is not None else [int(v) for v in np.unique(answer[answer > 0])]
    for k in np.flatnonzero(covered):
        plane = merged[k]
        for v in values:
            plane[plane == v] = 0
        if value is None:
            plane[answer[k] > 0] = answer[k][answer[k] > 0]
        else:
            plane[answer[k] > 0] = value
    return merged


def datastore_id(datastore: Datastore, path: str) -> str | None:
    """The datastore id whose image is the file (or DICOM folder) `path`; None for uploads and
    session images. Only the ids the file name allows are asked about."""
    name = os.path.basename(os.path.normpath(path))
    ext = extension_of(name)
    real = os.path.realpath(path)
    for candidate in dict.fromkeys([name[: -len(ext)] if ext else name, name]):
        try:
            uri = datastore.get_image_uri(candidate)
        except Exception:  # remote datastores raise their client's errors for unknown ids
            continue
        if uri and os.path.realpath(uri) == real:
            return candidate
    return None


class DraftWriter:
    """Stores each answer on a datastore image as (part of) the image's draft label."""

    def __init__(self, datastore: Callable[[], Datastore | None], labels: Sequence[str]) -> None:
        self.datastore = datastore
        self.labels = list(labels)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsam-drafts")
        self._lock = threading.Lock()
        self._counts = {"queued": 0, "written": 0, "skipped": 0, "failed": 0}

    def status(self) -> dict[str, int]:
        """Answers queued for drafting since start, and what became of them (pending = queued - rest)."""
        with self._lock:
            counts = dict(self._counts)
        counts["pending"] = counts["queued"] - counts["written"] - counts["skipped"] - counts["failed"]
        return counts

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def value_of(self, name: object) -> int | None:
        """The draft value of a label name: its 1-based position in the task's labels."""
        return self.labels.index(str(name)) + 1 if str(name) in self.labels else None

    def save(self, image_path: str, volume: Volume, answer: np.ndarray, label_name: object,
             model_version: str) -> dict[str, Any]:
        """Queue `answer` for the draft of the image at `image_path`; what will be done, for the reply."""
        datastore = self.datastore()
        image_id = datastore_id(datastore, image_path) if datastore is not None else None
        if image_id is None:
            return {"queued": False, "reason": "not a datastore image (an upload or a session)"}
        if not answer.any():
            return {"queued": False, "image": image_id, "reason": "empty answer"}
        if datastore.get_label_by_image_id(image_id, FINAL):
            return {"queued": False, "image": image_id, "reason": "the image has a final label"}
        value = self.value_of(label_name)
        self._count("queued")
        self._worker.submit(self._write, datastore, image_id, volume, answer, label_name, value, model_version)
        return {"queued": True, "image": image_id, "tag": DRAFT, "value": value}

    def _write(self, datastore: Datastore, image_id: str, volume: Volume, answer: np.ndarray, label_name: object,
               value: int | None, model_version: str) -> None:
        try:
            self._count(self._merge(datastore, image_id, volume, answer, label_name, value, model_version))
        except Exception:  # a draft is a convenience: log it, keep serving
            logger.exception("could not update the draft of %s", image_id)
            self._count("failed")

    def _merge(self, datastore: Datastore, image_id: str, volume: Volume, answer: np.ndarray, label_name: object,
               value: int | None, model_version: str) -> str:
        """Merge one answer into the stored draft; "written", or "skipped" when a final label came first."""
        if datastore.get_label_by_image_id(image_id, FINAL):
            return "skipped"
        label_id = datastore.get_label_by_image_id(image_id, DRAFT)
        draft, names = None, {}
        if label_id:
            draft = read_image(datastore.get_label_uri(label_id, DRAFT)).array
            names = dict((datastore.get_label_info(label_id, DRAFT) or {}).get("label_names") or {})
            if draft.shape != answer.shape:  # a draft of another grid: start over
                draft, names = None, {}
        merged = merge_draft(draft, answer, value)
        if value is not None:
            names[str(label_name)] = value
        info = {"label_names": names, "model": model_version, "source": "medsam infer"}
        fd, tmp = tempfile.mkstemp(prefix="medsam-draft-", suffix=".nii.gz")
        os.close(fd)
        try:
            sitk.WriteImage(label_image(merged, volume), tmp, useCompression=True)
            datastore.save_label(image_id, tmp, DRAFT, info)
        finally:
            os.unlink(tmp)
        logger.info("draft of %s updated (label %s, value %s)", image_id, label_name, value)
        return "written"
