"""Start training by itself after every N new final labels (`--conf auto_train_every N`)."""

from __future__ import annotations

import threading

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag


class AutoTrain:
    """Counts saves that changed an image's final label (a draft saved as `original` does not count)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.pending = 0
        self._seen: dict[str, object] = {}
        self._lock = threading.Lock()

    def label_saved(self, datastore: Datastore, image_id: str, label_id: str) -> bool:
        """Record a save; True when `every` final labels have been saved since the last start."""
        if self.every <= 0:
            return False
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL.value) or {}
        stamp = (info.get("ts"), info.get("checksum"))
        with self._lock:
            if info and self._seen.get(image_id) != stamp:
                self._seen[image_id] = stamp
                self.pending += 1
            return self.pending >= self.every

    def started(self) -> None:
        with self._lock:
            self.pending = 0
