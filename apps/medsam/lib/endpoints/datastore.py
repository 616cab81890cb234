"""The app's /datastore routes, in place of MONAI Label's own.

MONAI Label's PUT /datastore/image stores any bytes as an image and replaces an existing image of
the same id; its info updates, image removal and checksum check answer 500 to malformed JSON,
unknown ids or an unknown hash, and its info reads and label removal answer 200 for ids it does not
have. Its checksum check always answers 404 (it compares a bare hex digest with "SHA256:hex").
These routes keep the interface and:

- store only files the engine reads whole (`check_image`, else 400), never over an existing image
  (409), and not into a remote datastore (501: upload there);
- answer 404 to unknown images and labels, 400 to malformed JSON.

Which ids are valid is the datastore's rule (lib/datastore/ids.py); which error gets which status
is lib/endpoints/errors.py's; a label's checks are the datastore's `save_label`.
"""

from __future__ import annotations

import os
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from medsam_engine.imageio import IMAGE_EXTENSIONS, extension_of

from lib.datastore import ImageNotFound
from lib.endpoints.params import LabelParams, parse
from lib.datastore.checks import check_image, check_label
from lib.endpoints.uploads import saved
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import LabelNotFoundException
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import file_checksum, get_mime_type

router = APIRouter(prefix="/datastore", tags=["Datastore"])

CHECKSUM_ALGORITHMS = ("SHA256", "SHA512", "MD5")  # what MONAI Label's file_checksum computes


def datastore() -> Datastore:
    return app_instance().datastore()


def upload_extensions() -> tuple[str, ...]:
    """Image extensions both the engine and the datastore (MONAI_LABEL_DATASTORE_FILE_EXT) take."""
    listed = {pattern.lstrip("*") for pattern in settings.MONAI_LABEL_DATASTORE_FILE_EXT}
    return tuple(ext for ext in IMAGE_EXTENSIONS if ext in listed)


def image_uri(image: str) -> str:
    """The server path of datastore image `image` (ImageNotFound when the datastore has none)."""
    path = datastore().get_image_uri(image)
    if not path:
        raise ImageNotFound(f"unknown image id {image!r}: not in this server's datastore")
    return path


def image_file(image: str) -> str:
    """`image_uri`, when it is one file (not a folder of DICOM slices): else 404."""
    path = image_uri(image)
    if not os.path.isfile(path):
        raise HTTPException(status_code=404, detail=f"image {image!r} is no single file on this server")
    return path


def label_file(label: str, tag: str) -> str:
    """The file of label `label` with tag `tag` (LabelNotFoundException when there is none)."""
    path = datastore().get_label_uri(label, tag)
    if not path or not os.path.isfile(path):
        raise LabelNotFoundException(f"no label {label!r} with tag {tag!r}")
    return path


def checksum_matches(path: str, check_sum: str) -> bool:
    """Whether the file's checksum is `check_sum`: "ALGO:HEX" as MONAI Label's `file_checksum` writes
    it, or a bare SHA256 hex digest; 400 for an unknown ALGO."""
    algo, _, digest = check_sum.rpartition(":")
    algo = algo.upper() or "SHA256"
    if algo not in CHECKSUM_ALGORITHMS:
        raise HTTPException(status_code=400, detail=f"check_sum must be HEX (SHA256) or ALGO:HEX with ALGO one of "
                                                    f"{', '.join(CHECKSUM_ALGORITHMS)}")
    return file_checksum(path, algo=algo) == f"{algo}:{digest.lower()}"


def with_user(values: dict, user: User) -> dict:
    if user and user.username:
        values["user"] = user.username
    return values


@router.put("/", summary=f"{RBAC_ANNOTATOR}Upload new Image", include_in_schema=False, deprecated=True)
@router.put("/image", summary=f"{RBAC_ANNOTATOR}Upload new Image")
def api_add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                  user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    info = with_user(parse(params), user)
    store = datastore()
    if not isinstance(store, LocalDatastore) or isinstance(store, DICOMWebDatastore):
        raise HTTPException(status_code=501, detail="this server's images come from a remote store (DICOMweb, XNAT "
                                                    "or DSA): upload there, or create a session (PUT /session/)")
    with saved(file) as path:
        ext = extension_of(path.name)
        if ext not in upload_extensions():
            raise HTTPException(status_code=400, detail=f"file {path.name!r}: the name must end in one of "
                                                        f"{', '.join(upload_extensions())}")
        image_id = image or path.name[: -len(ext)]
        if store.get_image_uri(image_id):  # before reading the file; checked again under the lock
            raise HTTPException(status_code=409, detail=f"image {image_id!r} exists: remove it first or pick another id")
        check_image(path)
        return {"image": store.add_image(image_id, str(path), info, replace=False)}


@router.delete("/", summary=f"{RBAC_ADMIN}Remove Image and corresponding labels", include_in_schema=False,
               deprecated=True)
@router.delete("/image", summary=f"{RBAC_ADMIN}Remove Image and corresponding labels")
def api_remove_image(id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    datastore().remove_image(id)
    return {}


@router.head("/image", summary=f"{RBAC_USER}Check If Image Exists")
def api_check_image(image: str, check_sum: Optional[str] = None,
                    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    path = image_file(image)
    if check_sum and not checksum_matches(path, check_sum):
        raise HTTPException(status_code=404, detail=f"image {image!r} has another checksum")
    return {}


@router.get("/image", summary=f"{RBAC_USER}Download Image")
def api_download_image(image: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    path = image_file(image)
    return FileResponse(path, media_type=get_mime_type(path), filename=os.path.basename(path))


@router.get("/image/info", summary=f"{RBAC_USER}Get Image Info")
def api_get_image_info(image: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    image_uri(image)
    return datastore().get_image_info(image)


@router.put("/image/info", summary=f"{RBAC_ANNOTATOR}Update Image Info")
def api_put_image_info(image: str, info: str = Form("{}"),
                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    return datastore().update_image_info(image, with_user(parse(info, field="info"), user))


@router.put("/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label")
def api_save_label(image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value,
                   label: UploadFile = File(...), user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """The label is checked (`check_label`: a sane file; the datastore's `save_label`: on the
    image's grid) before anything is stored; a DICOMweb datastore stores it as DICOM SEG."""
    info = with_user(parse(params, LabelParams), user)
    image_uri(image)
    with saved(label) as path:
        check_label(path)
        label_id = datastore().save_label(image, str(path), tag or DefaultLabelTag.FINAL.value, info)
    result = app_instance().on_save_label(image, label_id) or {}
    return {**result, "image": image, "label": label_id}


@router.get("/label/info", summary=f"{RBAC_USER}Get Label Info")
def api_get_label_info(label: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    label_file(label, tag)
    return datastore().get_label_info(label, tag)


@router.get("/label", summary=f"{RBAC_USER}Download Label")
def api_download_label(label: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    path = label_file(label, tag)
    return FileResponse(path, media_type=get_mime_type(path), filename=os.path.basename(path))


@router.head("/label", summary=f"{RBAC_USER}Check If Label Exists")
def api_check_label(image: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    label_file(image, tag)
    return {}


@router.delete("/label", summary=f"{RBAC_ADMIN}Remove Label")
def api_remove_label(id: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    label_file(id, tag)
    datastore().remove_label(id, tag)
    return {}


@router.put("/label/info", summary=f"{RBAC_ANNOTATOR}Update Label Info")
def api_put_label_info(label: str, tag: str, info: str = Form("{}"),
                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    return datastore().update_label_info(label, tag, with_user(parse(info, field="info"), user))


@router.put("/updatelabelinfo", summary=f"{RBAC_ANNOTATOR}Update label info", include_in_schema=False,
            deprecated=True)
def api_update_label_info(label: str, tag: str, params: str = Form("{}"),
                          user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    return datastore().update_label_info(label, tag, with_user(parse(params), user))
