"""The app's PUT /datastore/label, put in place of MONAI Label's own when the server starts.

MONAI Label's route answers 500 to any error the datastore raises (a label on the wrong grid, an
unreadable file, malformed `params`) and runs the save, which for a DICOMweb datastore writes a
DICOM SEG and uploads it, inside an `async` handler that blocks the event loop. This route keeps
its interface (form fields `params` and `label`, query `image` and `tag`) and answers:
- 400 to malformed `params` and to a label the datastore refuses (`LabelRejected`);
- 404 to an image the datastore does not have;
- 502 when the PACS does not store the SEG;
and it is a plain function, which FastAPI runs in its thread pool.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, UploadFile

from lib.endpoints import json_object, replace_route
from lib.datastore import ImageNotFound, LabelRejected, StoreFailed
from monailabel.config import RBAC_ANNOTATOR, settings
from monailabel.datastore.local import ImageNotFoundException
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance


router = APIRouter(prefix="/datastore", tags=["Datastore"])


@router.put("/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label")
def api_save_label(
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    save_params = json_object(params)
    if user and user.username:
        save_params["user"] = user.username
    suffix = "".join(pathlib.Path(label.filename).suffixes) if label.filename else ".nii.gz"
    fd, path = tempfile.mkstemp(prefix="medsam-save-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(label.file, out)
        instance = app_instance()
        try:
            label_id = instance.datastore().save_label(image, path, tag or DefaultLabelTag.FINAL.value, save_params)
        except LabelRejected as exc:
            raise HTTPException(status_code=400, detail=f"label refused, nothing stored: {exc}") from None
        except (ImageNotFound, ImageNotFoundException) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except StoreFailed as exc:
            raise HTTPException(status_code=502, detail=str(exc)) from None
    finally:
        os.unlink(path)
    result = instance.on_save_label(image, label_id) or {}
    result.update({"image": image, "label": label_id})
    return result


def install(app: FastAPI | None = None) -> bool:
    """Put this route in place of MONAI Label's PUT /datastore/label in the running server's app."""
    return replace_route(router, "PUT", app)
