"""The app's PUT /datastore/label, put in place of MONAI Label's own when the server starts.

MONAI Label's route answers 500 to any error the datastore raises (a label on the wrong grid, an
unreadable file, malformed `params`), stores whatever bytes a client sends as a label of a local
datastore (a corrupt NIfTI became a final label, with a 200), joins the `tag` query to the labels
folder unchecked (`?tag=../..` writes outside the datastore), and runs the save, which for a
DICOMweb datastore writes a DICOM SEG and uploads it, inside an `async` handler that blocks the
event loop. This route keeps its interface (form fields `params` and `label`, query `image` and
`tag`) and answers:
- 400 to malformed `params`, an image id or tag that is not a plain name, and a label that is unreadable,
  truncated, or not on the image's grid (for a local datastore the label is checked as for DICOMweb,
  `lib.datastore.seg.read_label`, and stored as NIfTI);
- 404 to an image the datastore does not have;
- 502 when the PACS does not store the SEG, 507 when the datastore's disk refuses the write;
and it is a plain function, which FastAPI runs in its thread pool.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, UploadFile
from medsam_engine import EngineInputError
from medsam_engine.imageio import VOLUME_EXTENSIONS, extension_of, read_image

from lib.datastore import ImageNotFound, LabelRejected, StorageError, StoreFailed
from lib.datastore.seg import read_label
from lib.endpoints import json_object, replace_routes, safe_id
from lib.endpoints.datastore import local_datastore
from lib.endpoints.uploads import check_header, saved
from monailabel.config import RBAC_ANNOTATOR, settings
from monailabel.datastore.local import ImageNotFoundException
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance

router = APIRouter(prefix="/datastore", tags=["Datastore"])


def check_label_file(path: Path) -> None:
    """400 unless the label file's header reads, declares a sane size and (NIfTI) holds every voxel,
    all finite: SimpleITK fills a truncated NIfTI with zeros, and reads NaN and inf in one as 0,
    instead of failing; the engine's reader checks the first, nibabel (which keeps them) the second."""
    if path.name.endswith(".bin"):  # OHIF's raw voxels: checked against the image's size when read
        return
    try:
        check_header(path, "label")
    except HTTPException as exc:
        raise HTTPException(status_code=exc.status_code, detail=f"label refused, nothing stored: {exc.detail}") from None
    if extension_of(path) in VOLUME_EXTENSIONS:
        try:
            read_image(path)
        except EngineInputError as exc:
            raise HTTPException(status_code=400, detail=f"label refused, nothing stored: {exc}") from None
    if extension_of(path) in (".nii", ".nii.gz"):
        data = nib.load(str(path)).dataobj
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(np.asanyarray(data)).all():
            raise HTTPException(status_code=400, detail="label refused, nothing stored: label values must be finite "
                                                        "numbers (it holds NaN or infinity)")


def save_local_label(datastore: Datastore, image: str, path: Path, tag: str, params: dict) -> str:
    """The label checked against the image's grid and stored as NIfTI in a local datastore."""
    uri = datastore.get_image_uri(image)
    if not uri:
        raise ImageNotFound(f"unknown image id {image!r}: not in this server's datastore")
    label = read_label(path, sitk.ReadImage(uri))
    fd, checked = tempfile.mkstemp(prefix="medsam-label-", suffix=".nii.gz")
    os.close(fd)
    try:
        sitk.WriteImage(label, checked, True)
        return datastore.save_label(image, checked, tag, params)
    finally:
        os.unlink(checked)


@router.put("/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label")
def api_save_label(
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    save_params = json_object(params)
    image = safe_id(image, "image id")
    tag = safe_id(tag, "tag") if tag else DefaultLabelTag.FINAL.value
    if user and user.username:
        save_params["user"] = user.username
    instance = app_instance()
    local = local_datastore()
    with saved(label) as path:
        check_label_file(path)
        try:
            if local is not None:
                label_id = save_local_label(local, image, path, tag, save_params)
            else:
                label_id = instance.datastore().save_label(image, str(path), tag, save_params)
        except LabelRejected as exc:
            raise HTTPException(status_code=400, detail=f"label refused, nothing stored: {exc}") from None
        except (ImageNotFound, ImageNotFoundException) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except StoreFailed as exc:
            raise HTTPException(status_code=502, detail=str(exc)) from None
        except StorageError as exc:
            raise HTTPException(status_code=507, detail=str(exc)) from None
    result = instance.on_save_label(image, label_id) or {}
    result.update({"image": image, "label": label_id})
    return result


def install(app: FastAPI | None = None) -> bool:
    """Put this route in place of MONAI Label's PUT /datastore/label in the running server's app."""
    return replace_routes(router, app)
