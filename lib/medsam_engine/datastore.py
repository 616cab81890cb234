"""MONAI Label's local datastore layout: images at the top, final labels in labels/final/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineInputError
from .imageio import IMAGE_EXTENSIONS, extension_of


@dataclass(frozen=True)
class Case:
    image_id: str
    image: Path
    label: Path | None


def image_id_of(path: Path) -> str:
    """The datastore id of an image file: its name without the image extension."""
    return path.name[: -len(extension_of(path))]


def list_cases(root: str | Path, labelled_only: bool = True) -> list[Case]:
    """Images at the top of `root` with their final label (same file name) when present."""
    root = Path(root)
    if not root.is_dir():
        raise EngineInputError(f"datastore not found: {root}")
    cases = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or extension_of(path) not in IMAGE_EXTENSIONS:
            continue
        label = root / "labels" / "final" / path.name
        if label.is_file() or not labelled_only:
            cases.append(Case(image_id_of(path), path, label if label.is_file() else None))
    return cases


def label_names(root: str | Path) -> dict[str, dict[int, str]]:
    """Optional labels.json: {image_id: {label value: name}}."""
    path = Path(root) / "labels.json"
    if not path.is_file():
        return {}
    return {image: {int(v): name for v, name in values.items()}
            for image, values in json.loads(path.read_text()).items()}
