"""The app's /datastore image routes and info updates, in place of MONAI Label's own.

MONAI Label's PUT /datastore/image turns the `image` query (or the file name) into a file name in
the datastore unchecked (`?image=../../x` writes outside it), stores any bytes as an image, and
replaces an existing image of the same id; its info updates, image removal and checksum check
answer 500 to malformed JSON, unknown ids or an unknown hash, and its info reads and label removal
answer 200 for ids it does not have. Its checksum check always answers 404 (it compares a bare hex
digest with "SHA256:hex"). With a DICOMweb datastore, MONAI Label joins any id to its cache folder.
These routes keep the interface and:

- accept only plain ids (`safe_id`), on every route, and files the engine reads whole
  (`check_image`): else 400;
- refuse to replace an existing image (409) and uploads to a remote datastore (405);
- answer 404 to unknown images and labels, 400 to malformed JSON, 507 when the disk refuses a write.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from medsam_engine.imageio import IMAGE_EXTENSIONS, extension_of

from lib.datastore import ImageExists, StorageError
from lib.endpoints import json_object, replace_routes, safe_id
from lib.endpoints.uploads import check_image, saved
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.endpoints.datastore import download_label, remove_image
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import file_checksum, get_mime_type

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/datastore", tags=["Datastore"])

CHECKSUM_ALGORITHMS = ("SHA256", "SHA512", "MD5")  # what MONAI Label's file_checksum computes


def local_datastore() -> Datastore | None:
    """The server's datastore when it is a folder on this server (not DICOMweb, XNAT or DSA)."""
    datastore = app_instance().datastore()
    is_local = isinstance(datastore, LocalDatastore) and not isinstance(datastore, DICOMWebDatastore)
    return datastore if is_local else None


def upload_extensions() -> tuple[str, ...]:
    """Image extensions both the engine and the datastore (MONAI_LABEL_DATASTORE_FILE_EXT) take."""
    listed = {pattern.lstrip("*") for pattern in settings.MONAI_LABEL_DATASTORE_FILE_EXT}
    return tuple(ext for ext in IMAGE_EXTENSIONS if ext in listed)


def image_uri(image: str) -> str:
    """The server path of datastore image `image`: 400 unless it is a plain id, 404 when unknown."""
    image = safe_id(image, "image id")
    try:
        path = app_instance().datastore().get_image_uri(image)
    except Exception as exc:  # remote datastores raise their client's errors for unknown series
        logger.info("image %r not found in the datastore: %s", image, exc)
        path = ""
    if not path:
        raise HTTPException(status_code=404, detail=f"unknown image id {image!r}: not in this server's datastore")
    return path


def image_file(image: str) -> str:
    """`image_uri`, when it is one file (not a folder of DICOM slices): else 404."""
    path = image_uri(image)
    if not os.path.isfile(path):
        raise HTTPException(status_code=404, detail=f"image {image!r} is no single file on this server")
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


def label_ids(label: str, tag: str) -> tuple[str, str]:
    """The label id and tag a client gave, each a plain id (`safe_id`): else 400."""
    return safe_id(label, "label id"), safe_id(tag, "tag")


@router.put("/", summary=f"{RBAC_ANNOTATOR}Upload new Image", include_in_schema=False, deprecated=True)
@router.put("/image", summary=f"{RBAC_ANNOTATOR}Upload new Image")
def api_add_image(
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    info = json_object(params)
    datastore = local_datastore()
    if datastore is None:
        raise HTTPException(status_code=405, detail="this server's images come from a remote store (DICOMweb, XNAT "
                                                    "or DSA): upload there, or create a session (PUT /session/)")
    with saved(file) as path:
        ext = extension_of(path.name)
        if ext not in upload_extensions():
            raise HTTPException(status_code=400, detail=f"file {path.name!r}: the name must end in one of "
                                                        f"{', '.join(upload_extensions())}")
        image_id = safe_id(image or path.name[: -len(ext)], "image id")
        if datastore.get_image_uri(image_id):
            raise HTTPException(status_code=409, detail=f"image {image_id!r} exists: remove it first or pick another id")
        check_image(path)
        if user.username:
            info["user"] = user.username
        try:
            return {"image": datastore.add_image(image_id, str(path), info, replace=False)}
        except ImageExists as exc:  # stored by a request that passed the check above meanwhile
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except StorageError as exc:
            raise HTTPException(status_code=507, detail=str(exc)) from None


@router.delete("/", summary=f"{RBAC_ADMIN}Remove Image and corresponding labels", include_in_schema=False,
               deprecated=True)
@router.delete("/image", summary=f"{RBAC_ADMIN}Remove Image and corresponding labels")
def api_remove_image(id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    try:
        return remove_image(safe_id(id, "image id"), user.username)
    except ImageNotFoundException:
        raise HTTPException(status_code=404, detail=f"unknown image id {id!r}") from None


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
    return app_instance().datastore().get_image_info(image)


@router.put("/image/info", summary=f"{RBAC_ANNOTATOR}Update Image Info")
def api_put_image_info(image: str, info: str = Form("{}"),
                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    image = safe_id(image, "image id")
    values = json_object(info, "info")
    if user.username:
        values["user"] = user.username
    try:
        return app_instance().datastore().update_image_info(image, values)
    except ImageNotFoundException:
        raise HTTPException(status_code=404, detail=f"unknown image id {image!r}") from None
    except StorageError as exc:
        raise HTTPException(status_code=507, detail=str(exc)) from None


def known_label(label: str, tag: str) -> Datastore:
    """The datastore, when it holds label `label` with tag `tag` (plain ids, else 400); else 404."""
    label, tag = label_ids(label, tag)
    datastore = app_instance().datastore()
    if not datastore.get_label_uri(label, tag):
        raise HTTPException(status_code=404, detail=f"no label {label!r} with tag {tag!r}")
    return datastore


@router.get("/label/info", summary=f"{RBAC_USER}Get Label Info")
def api_get_label_info(label: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    return known_label(label, tag).get_label_info(label, tag)


@router.get("/label", summary=f"{RBAC_USER}Download Label")
def api_download_label(label: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    return download_label(*label_ids(label, tag))


@router.head("/label", summary=f"{RBAC_USER}Check If Label Exists")
def api_check_label(image: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    return download_label(*label_ids(image, tag), check_only=True)


@router.delete("/label", summary=f"{RBAC_ADMIN}Remove Label")
def api_remove_label(id: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    known_label(id, tag).remove_label(id, tag)
    return {}


def update_label_info(label: str, tag: str, text: str, field: str, user: User):
    label, tag = label_ids(label, tag)
    values = json_object(text, field)
    if user.username:
        values["user"] = user.username
    try:
        return app_instance().datastore().update_label_info(label, tag, values)
    except LabelNotFoundException:
        raise HTTPException(status_code=404, detail=f"no label {label!r} with tag {tag!r}") from None
    except StorageError as exc:
        raise HTTPException(status_code=507, detail=str(exc)) from None


@router.put("/label/info", summary=f"{RBAC_ANNOTATOR}Update Label Info")
def api_put_label_info(label: str, tag: str, info: str = Form("{}"),
                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    return update_label_info(label, tag, info, "info", user)


@router.put("/updatelabelinfo", summary=f"{RBAC_ANNOTATOR}Update label info", include_in_schema=False,
            deprecated=True)
def api_update_label_info(label: str, tag: str, params: str = Form("{}"),
                          user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    return update_label_info(label, tag, params, "params", user)


def install(app: FastAPI | None = None) -> bool:
    """Put these routes in place of MONAI Label's in the running server's app."""
    return replace_routes(router, app)
