"""The app's /session routes, in place of MONAI Label's own.

MONAI Label's PUT /session/ keeps any bytes as a session image and, with `uncompress=true`, unpacks
a tar archive with no filter (members named `../x` or `/x`, or links, land outside the session
store); its GET and DELETE join the session id to the store's folder unchecked, and GET with
`image=true` answers 500 for a DICOM series session (a folder). These routes keep the interface and:

- keep a session only when its image reads whole (a file, or a DICOM series folder): else 400;
- unpack zip and tar archives member by member, refusing paths that leave the folder, links, and
  more than four times the upload limit unpacked;
- accept only session ids of the form the store makes (a UUID): else 404.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import List

from fastapi import APIRouter, Depends, File, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse

from lib.endpoints.guard import DEFAULT_MAX_UPLOAD_MB
from lib.datastore.checks import check_image
from lib.endpoints.uploads import spool
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.session import remove_session
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import get_basename, get_mime_type
from monailabel.utils.sessions import Sessions

router = APIRouter(prefix="/session", tags=["Session"])

SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
UNPACKED_PER_UPLOAD = 4  # unpacked bytes allowed per byte of the upload limit


def check_session_id(session_id: str) -> str:
    """The id when it has the form MONAI Label's session store gives (a UUID), else a 404."""
    if not SESSION_ID.fullmatch(session_id):
        raise HTTPException(status_code=404, detail=f"unknown session {session_id!r} (expired or never created)")
    return session_id


def _sessions() -> Sessions:
    sessions = app_instance().sessions()
    if sessions is None:
        raise HTTPException(status_code=501, detail="sessions are not enabled on this server (MONAI_LABEL_SESSIONS)")
    return sessions


def _leaves(name: str) -> bool:
    """Whether an archive member's name is absolute or climbs out with `..`."""
    return name.startswith(("/", "\\")) or ".." in Path(name.replace("\\", "/")).parts


def _unpack(archive: Path, folder: Path, max_bytes: int) -> None:
    """Unpack a zip or tar archive into `folder`, or 400: members with absolute or `..` names,
    links (zip; tar: Python's "data" filter also refuses links out and devices), or more than
    `max_bytes` in all."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = [(m.filename, m.file_size, (m.external_attr >> 28) == 0xA) for m in zf.infolist()]
                _check_members(members, max_bytes)
                zf.extractall(folder)
            return
        with tarfile.open(archive) as tf:
            _check_members([(m.name, m.size, False) for m in tf.getmembers()], max_bytes)
            tf.extractall(folder, filter="data")
    except tarfile.FilterError as exc:
        raise HTTPException(status_code=400, detail=f"archive refused: {exc}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise HTTPException(status_code=400, detail=f"uncompress: not a readable zip or tar archive ({exc})") from None


def _check_members(members: list[tuple[str, int, bool]], max_bytes: int) -> None:
    for name, _, is_link in members:
        if _leaves(name) or is_link:
            raise HTTPException(status_code=400, detail=f"archive member {name!r} leads out of the folder or is a link")
    if sum(size for _, size, _ in members) > max_bytes:
        raise HTTPException(status_code=400, detail=f"the archive unpacks to more than {max_bytes >> 20} MB")


def _image_of(folder: Path) -> Path:
    """What an unpacked archive holds: its one file, or the folder (down through lone subfolders)."""
    while True:
        entries = list(folder.iterdir())
        if len(entries) != 1:
            return folder
        if entries[0].is_file():
            return entries[0]
        folder = entries[0]


@router.put("/", summary=f"{RBAC_USER}Create new session with Image")
def api_create_session(
    request: Request,
    uncompress: bool = False,
    expiry: int = 0,
    files: List[UploadFile] = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    sessions = _sessions()
    if expiry < 0:
        raise HTTPException(status_code=400, detail="expiry must be 0 (the default) or a number of seconds")
    if uncompress and len(files) != 1:
        raise HTTPException(status_code=400, detail="uncompress takes exactly one archive")
    received = Path(tempfile.mkdtemp(prefix="medsam-session-"))
    try:
        paths = [spool(upload, received, f"file{i}") for i, upload in enumerate(files)]
        if len(set(paths)) != len(paths):
            raise HTTPException(status_code=400, detail="two uploaded files have the same name")
        image = paths[0] if len(files) == 1 else received
        if uncompress:
            unpacked = Path(tempfile.mkdtemp(dir=received))
            limit = getattr(request.app.state, "max_upload_bytes", DEFAULT_MAX_UPLOAD_MB << 20)
            _unpack(image, unpacked, UNPACKED_PER_UPLOAD * limit)
            image = _image_of(unpacked)
        check_image(image, "session image")
        session_id, info = sessions.add_session(str(image), expiry, False)
    finally:
        shutil.rmtree(received, ignore_errors=True)
    return {"session_id": session_id, "session_info": info.to_json()}


@router.get("/{session_id}", summary=f"{RBAC_USER}Get Session ID")
def api_get_session(session_id: str, update_ts: bool = False, image: bool = False,
                    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    info = _sessions().get_session(check_session_id(session_id), update_ts=update_ts)
    if not info:
        raise HTTPException(status_code=404, detail=f"unknown session {session_id!r} (expired or never created)")
    if not image:
        return info.to_json()
    if not os.path.isfile(info.image):
        raise HTTPException(status_code=400, detail="this session holds a DICOM series (a folder), not one file")
    return FileResponse(info.image, media_type=get_mime_type(info.image), filename=get_basename(info.image))


@router.delete("/{session_id}", summary=f"{RBAC_USER}Delete Session")
def api_remove_session(session_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    return remove_session(check_session_id(session_id))
