"""What an image or label file must be before anything keeps it (the datastore, the session store)
or reads it for inference: its header readable and declaring a sane size, and (images, labels)
every voxel there. Raised as `UnreadableFile` or `LabelRejected` (400, lib/endpoints/errors.py).
SimpleITK's readers are the check, with the engine's reader (`VolumeCache`, as inference reads).
"""

from __future__ import annotations

import os
import pathlib

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from medsam_engine import EngineInputError
from medsam_engine.imageio import IMAGE_EXTENSIONS, VOLUME_EXTENSIONS, extension_of, read_image

from lib.datastore.errors import LabelRejected, UnreadableFile
from lib.infers.volumes import VolumeCache

# Voxels (times components) an uploaded image's header may declare: 512 x 512 x 2048. A few-byte
# file can declare billions of voxels, which the reader would allocate before finding the data short.
MAX_VOXELS = 1 << 29


def read_header(path: pathlib.Path, what: str) -> sitk.ImageFileReader:
    """A reader that has read the file's header (not its voxels): UnreadableFile when SimpleITK cannot."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].replace(str(path), path.name)
        raise UnreadableFile(f"cannot read the {what} file {path.name}: {reason}") from None
    return reader


def check_size(size: tuple[int, ...], components: int, what: str) -> None:
    """UnreadableFile when an image of `size` voxels of `components` values is over MAX_VOXELS in all."""
    voxels = components
    for n in size:
        voxels *= n
    if voxels > MAX_VOXELS:
        raise UnreadableFile(f"the {what} declares {'x'.join(map(str, size))} voxels"
                             f"{f' of {components} values' if components > 1 else ''}, "
                             f"more than this server reads ({MAX_VOXELS})")


def check_header(path: str | os.PathLike, what: str = "image") -> sitk.ImageFileReader:
    """UnreadableFile unless SimpleITK reads the file's header and the size it declares is sane."""
    path = pathlib.Path(path)
    if extension_of(path) not in IMAGE_EXTENSIONS:
        raise UnreadableFile(f"{what} file {path.name!r}: the name must end in one of "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
    reader = read_header(path, what)
    check_size(reader.GetSize(), reader.GetNumberOfComponents(), f"{what} file")
    return reader


def check_image(path: str | os.PathLike, what: str = "image") -> None:
    """UnreadableFile unless the file (or folder: a DICOM series) is an image the engine reads whole
    (header, size, every voxel there), with the reader inference uses."""
    path = pathlib.Path(path)
    if path.is_dir():
        check_series(path, what)
    else:
        check_header(path, what)
    try:
        VolumeCache(max_items=1).get(path)
    except EngineInputError as exc:
        raise UnreadableFile(f"{what}: {str(exc).replace(str(path.parent) + os.sep, '')}") from None


def check_series(folder: pathlib.Path, what: str = "image") -> None:
    """UnreadableFile unless every file in the folder is a slice of one DICOM series (GDCM leaves out
    a file it cannot read, a truncated slice, and reads the rest, so a count is the check) and one
    slice's size times the number of slices is sane."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    series = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    if not series or len(series) != len(files):
        raise UnreadableFile(f"{what}: {len(files) - len(series)} of the {len(files)} files "
                             "are not readable slices of one DICOM series")
    reader = read_header(pathlib.Path(series[0]), what)
    check_size((*reader.GetSize(), len(series)), reader.GetNumberOfComponents(), f"{what} series")


def check_label(path: pathlib.Path) -> None:
    """LabelRejected unless the label file's header reads, declares a sane size and (NIfTI) holds
    every voxel, all finite: SimpleITK fills a truncated NIfTI with zeros, and reads NaN and inf in one as 0,
    instead of failing; the engine's reader checks the first, nibabel (which keeps them) the second.
    (Whether it lies on its image's grid is the datastore's check, in `save_label`.)"""
    if path.name.endswith(".bin"):  # OHIF's raw voxels: checked against the image's size when read
        return
    try:
        check_header(path, "label")
        if extension_of(path) in VOLUME_EXTENSIONS:
            read_image(path)
    except (UnreadableFile, EngineInputError) as exc:
        raise LabelRejected(str(exc)) from None
    if extension_of(path) in (".nii", ".nii.gz"):
        data = nib.load(str(path)).dataobj
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(np.asanyarray(data)).all():
            raise LabelRejected("label values must be finite numbers (it holds NaN or infinity)")
