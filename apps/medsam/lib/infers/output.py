"""The label file sent back: the format and pixel type the client asks for, on the image's grid."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import SimpleITK as sitk
from medsam_engine import EngineInputError
from medsam_engine.imageio import Volume, label_image

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")  # OHIF asks for ".nrrd" and reads nothing else
RESULT_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


def result_format(extension: object, dtype: object) -> tuple[str, type | None]:
    """Check the requested extension (default NIfTI) and pixel type (default: the engine's)."""
    ext = str(extension or ".nii.gz").lower()
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext not in RESULT_EXTENSIONS:
        raise EngineInputError(f"result_extension {extension!r} is not supported; use one of {', '.join(RESULT_EXTENSIONS)}")
    if dtype in (None, ""):
        return ext, None
    if str(dtype) not in RESULT_DTYPES:
        raise EngineInputError(f"result_dtype {dtype!r} is not supported; use one of {', '.join(RESULT_DTYPES)}")
    return ext, RESULT_DTYPES[str(dtype)]


def write_result(label: np.ndarray, volume: Volume, extension: str, dtype: type | None, compress: bool) -> str:
    """Write the label to a new temporary file (MONAI Label deletes it once sent).

    Not the engine's `write_label`: that one always compresses, and OHIF asks for raw NRRD
    (`result_compress: false`). The file is private to this request until returned, so it needs
    no rename to be safe.
    """
    if dtype is not None and label.max(initial=0) > np.iinfo(dtype).max:
        raise EngineInputError(f"label values do not fit result_dtype {np.dtype(dtype).name}")
    image = label_image(label if dtype is None else label.astype(dtype, copy=False), volume)
    fd, path = tempfile.mkstemp(prefix="medsam-", suffix=extension)
    os.close(fd)
    try:
        sitk.WriteImage(image, path, useCompression=compress)
    except BaseException:
        os.unlink(path)
        raise
    return path
