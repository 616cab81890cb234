"""Uploaded files: saved to temporary files, and checked before anything keeps them."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from fastapi import HTTPException, UploadFile
from medsam_engine import EngineInputError
from medsam_engine.imageio import IMAGE_EXTENSIONS, VOLUME_EXTENSIONS, extension_of, read_image

from lib.infers.volumes import VolumeCache

# Voxels (times components) an uploaded image's header may declare: 512 x 512 x 2048. A few-byte
# file can declare billions of voxels, which the reader would allocate before finding the data short.
MAX_VOXELS = 1 << 29
MAX_NAME_BYTES = 255  # a file name's limit on Linux file systems (NAME_MAX)


def file_name(upload: UploadFile, default: str) -> str:
    """The upload's file name without any folder part (a client's name is never a path here);
    `default` for a name no file can have (empty, `.`, `..`, a NUL, over 255 bytes)."""
    name = os.path.basename((upload.filename or "").replace("\\", "/"))
    unusable = name in ("", ".", "..") or "\0" in name or len(os.fsencode(name)) > MAX_NAME_BYTES
    return default if unusable else name


def spool(upload: UploadFile, folder: pathlib.Path, default_name: str) -> pathlib.Path:
    """The upload written into `folder`, named like it (the extension tells its format)."""
    path = folder / file_name(upload, default_name)
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return path


@contextmanager
def saved(upload: UploadFile, default_name: str = "upload.nii.gz") -> Iterator[pathlib.Path]:
    """The upload written to a temporary file named like it (`spool`); removed afterwards."""
    folder = tempfile.mkdtemp(prefix="medsam-upload-")
    try:
        yield spool(upload, pathlib.Path(folder), default_name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_header(path: pathlib.Path, what: str) -> sitk.ImageFileReader:
    """A reader that has read the file's header (not its voxels): 400 when SimpleITK cannot."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].replace(str(path), path.name)
        raise HTTPException(status_code=400, detail=f"cannot read the {what} file {path.name}: {reason}") from None
    return reader


def check_size(size: tuple[int, ...], components: int, what: str) -> None:
    """400 when an image of `size` voxels of `components` values is more than MAX_VOXELS in all."""
    voxels = components
    for n in size:
        voxels *= n
    if voxels > MAX_VOXELS:
        raise HTTPException(status_code=400, detail=f"the {what} declares {'x'.join(map(str, size))} voxels"
                                                    f"{f' of {components} values' if components > 1 else ''}, "
                                                    f"more than this server reads ({MAX_VOXELS})")


def check_header(path: str | os.PathLike, what: str = "image") -> sitk.ImageFileReader:
    """400 unless SimpleITK reads the file's header and the size it declares is sane."""
    path = pathlib.Path(path)
    if extension_of(path) not in IMAGE_EXTENSIONS:
        raise HTTPException(status_code=400, detail=f"{what} file {path.name!r}: the name must end in one of "
                                                    f"{', '.join(IMAGE_EXTENSIONS)}")
    reader = read_header(path, what)
    check_size(reader.GetSize(), reader.GetNumberOfComponents(), f"{what} file")
    return reader


def check_image(path: str | os.PathLike, what: str = "image") -> None:
    """400 unless the file (or folder: a DICOM series) is an image the engine reads whole (header,
    size, every voxel there), with the reader inference uses."""
    path = pathlib.Path(path)
    if path.is_dir():
        check_series(path, what)
    else:
        check_header(path, what)
    try:
        VolumeCache(max_items=1).get(path)
    except EngineInputError as exc:
        raise HTTPException(status_code=400, detail=f"{what}: {str(exc).replace(str(path.parent) + os.sep, '')}") from None


def check_series(folder: pathlib.Path, what: str = "image") -> None:
    """400 unless every file in the folder is a slice of one DICOM series (GDCM leaves out a file it
    cannot read, a truncated slice, and reads the rest, so a count is the check) and one slice's
    size times the number of slices is sane."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    series = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    if not series or len(series) != len(files):
        raise HTTPException(status_code=400, detail=f"{what}: {len(files) - len(series)} of the {len(files)} files "
                                                    "are not readable slices of one DICOM series")
    reader = read_header(pathlib.Path(series[0]), what)
    check_size((*reader.GetSize(), len(series)), reader.GetNumberOfComponents(), f"{what} series")


def check_label(path: pathlib.Path) -> None:
    """400 unless the label file's header reads, declares a sane size and (NIfTI) holds every voxel,
    all finite: SimpleITK fills a truncated NIfTI with zeros, and reads NaN and inf in one as 0,
    instead of failing; the engine's reader checks the first, nibabel (which keeps them) the second.
    (Whether it lies on its image's grid is the datastore's check, in `save_label`.)"""
    if path.name.endswith(".bin"):  # OHIF's raw voxels: checked against the image's size when read
        return
    refused = "label refused, nothing stored: "
    try:
        check_header(path, "label")
        if extension_of(path) in VOLUME_EXTENSIONS:
            read_image(path)
    except HTTPException as exc:
        raise HTTPException(status_code=exc.status_code, detail=refused + str(exc.detail)) from None
    except EngineInputError as exc:
        raise HTTPException(status_code=400, detail=f"{refused}{exc}") from None
    if extension_of(path) in (".nii", ".nii.gz"):
        data = nib.load(str(path)).dataobj
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(np.asanyarray(data)).all():
            raise HTTPException(status_code=400, detail=f"{refused}label values must be finite numbers (it holds NaN "
                                                        "or infinity)")
