"""Uploaded files: saved to temporary files, and checked before anything keeps them."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

import SimpleITK as sitk
from fastapi import HTTPException, UploadFile
from medsam_engine import EngineInputError
from medsam_engine.imageio import IMAGE_EXTENSIONS, extension_of

from lib.infers.volumes import VolumeCache

# Voxels (times components) an uploaded image's header may declare: 512 x 512 x 2048. A few-byte
# file can declare billions of voxels, which the reader would allocate before finding the data short.
MAX_VOXELS = 1 << 29


def file_name(upload: UploadFile, default: str) -> str:
    """The upload's file name without any folder part (a client's name is never a path here)."""
    name = os.path.basename((upload.filename or "").replace("\\", "/"))
    return default if name in ("", ".", "..") else name


@contextmanager
def saved(upload: UploadFile, default_name: str = "upload.nii.gz") -> Iterator[pathlib.Path]:
    """The upload written to a temporary file named like it (the extension tells its format);
    removed afterwards."""
    folder = tempfile.mkdtemp(prefix="medsam-upload-")
    path = pathlib.Path(folder) / file_name(upload, default_name)
    try:
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_header(path: str | os.PathLike, what: str = "image") -> sitk.ImageFileReader:
    """400 unless SimpleITK reads the file's header and the size it declares is sane."""
    path = pathlib.Path(path)
    if extension_of(path) not in IMAGE_EXTENSIONS:
        raise HTTPException(status_code=400, detail=f"{what} file {path.name!r}: the name must end in one of "
                                                    f"{', '.join(IMAGE_EXTENSIONS)}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].replace(str(path), path.name)
        raise HTTPException(status_code=400, detail=f"cannot read the {what} file {path.name}: {reason}") from None
    voxels = reader.GetNumberOfComponents()
    for n in reader.GetSize():
        voxels *= n
    if voxels > MAX_VOXELS:
        raise HTTPException(status_code=400, detail=f"the {what} file declares {'x'.join(map(str, reader.GetSize()))} "
                                                    f"voxels, more than this server reads ({MAX_VOXELS})")
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
    """400 unless every file in the folder is a slice of one DICOM series: GDCM leaves out a file it
    cannot read (a truncated slice) and reads the rest, so a count is the check."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    series = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    if len(series) != len(files):
        raise HTTPException(status_code=400, detail=f"{what}: {len(files) - len(series)} of the {len(files)} files "
                                                    "are not readable slices of one DICOM series")
