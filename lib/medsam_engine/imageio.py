"""Reading images and writing label volumes, all formats behind SimpleITK.

Arrays are (Z, Y, X) - slice, row, column - as SimpleITK returns them, so a slice's x is the
image's i index and y its j index; RGB images are (1, Y, X, 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomicio import atomic_write
from .errors import EngineInputError

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
PLANAR_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_EXTENSIONS = VOLUME_EXTENSIONS + PLANAR_EXTENSIONS


def extension_of(path: str | Path) -> str:
    """The image extension of `path` (".nii.gz" counts as one)."""
    name = str(path).lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(name).suffix


@dataclass
class Volume:
    """An image as (Z, Y, X[, 3]) array plus the SimpleITK geometry to write results on its grid."""

    array: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) in mm
    reference: sitk.Image
    key: str

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def num_slices(self) -> int:
        return self.array.shape[0]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.array.shape[1], self.array.shape[2]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def volume_from_sitk(image: sitk.Image, key: str) -> Volume:
    """Wrap a SimpleITK image as a Volume (2D images become one slice)."""
    array = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    if image.GetDimension() == 2:
        array = array[None]
        spacing = (1.0,) + spacing
    if image.GetNumberOfComponentsPerPixel() not in (1, 3):
        if image.GetNumberOfComponentsPerPixel() == 4:  # RGBA: drop alpha
            array = array[..., :3]
        else:
            raise EngineInputError(f"{key}: images need 1 or 3 channels, not {image.GetNumberOfComponentsPerPixel()}")
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4) or min(array.shape[:3]) < 1:
        raise EngineInputError(f"{key}: unsupported image shape {array.shape}")
    return Volume(array=array, spacing=spacing, reference=image, key=key)  # type: ignore[arg-type]


def read_image(path: str | Path, key: str | None = None) -> Volume:
    """Read a NIfTI/NRRD/MHA volume or a PNG/JPEG/TIFF image; unreadable files raise EngineInputError."""
    path = Path(path)
    if not path.is_file():
        raise EngineInputError(f"image file not found: {path.name}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise EngineInputError(f"cannot read image {path.name}: {str(exc).strip().splitlines()[-1]}") from None
    if extension_of(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    stat = path.stat()
    return volume_from_sitk(image, key or f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}")


def _check_nifti_complete(path: Path) -> None:
    """Raise EngineInputError for a truncated NIfTI file.

    Written here because SimpleITK's NIfTI reader fills the voxels missing from a truncated file with
    zeros instead of failing (its NRRD and MetaImage readers do fail); nibabel reads the header.
    """
    import gzip
    import zlib

    import nibabel as nib

    try:
        data = nib.load(str(path)).dataobj  # reads the header only; the data stays on disk
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError):
        # A header cut short in a .gz: SimpleITK read it (zero-filled), nibabel does not.
        raise EngineInputError(f"cannot read image {path.name}: the file is truncated or corrupt") from None
    needed = int(data.offset) + data.dtype.itemsize * int(np.prod(data.shape))
    if path.name.lower().endswith(".gz"):
        length = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    length += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise EngineInputError(f"cannot read image {path.name}: the file is truncated or corrupt") from None
    else:
        length = path.stat().st_size
    if length < needed:
        raise EngineInputError(f"cannot read image {path.name}: the file is truncated ({length} of {needed} bytes)")


def label_image(label: np.ndarray, reference: Volume) -> sitk.Image:
    """A label array (Z, Y, X) as a SimpleITK image on the reference's grid."""
    if label.shape != reference.array.shape[:3]:
        raise EngineInputError(f"label shape {label.shape} does not match image {reference.array.shape[:3]}")
    ref = reference.reference
    if ref.GetDimension() == 2:
        image = sitk.GetImageFromArray(label[0])
    else:
        image = sitk.GetImageFromArray(label)
    image.SetOrigin(ref.GetOrigin())
    image.SetSpacing(ref.GetSpacing())
    image.SetDirection(ref.GetDirection())
    return image


def write_label(label: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write a label on the reference's grid atomically: a temporary file, then a rename."""
    image = label_image(label, reference)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
