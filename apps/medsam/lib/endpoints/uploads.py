"""Uploaded files saved to temporary files, named like the client's file (its extension tells the
format). What such a file must be before anything keeps it: lib/datastore/checks.py."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from fastapi import UploadFile

from lib.datastore.ids import MAX_NAME_BYTES


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
