"""The app's routes that serve files of the server or forward to the PACS, in place of MONAI Label's.

- GET /ohif/{path}: MONAI Label's answers 500 for a folder (`/ohif/assets`) and, mistaking
  `os.pathsep` for `os.sep`, serves index.html for every file in a subfolder; this one serves the
  file under the OHIF folder that the path names, or index.html (OHIF routes in the browser).
- /proxy/dicom/...: MONAI Label's answers 500 when the studies are a local folder, forwards
  encoded `..` segments to the PACS, drops the query string (a QIDO search reaches the PACS without
  its filters) and fetches with blocking `requests` inside an `async` handler, so every OHIF fetch
  holds up the whole server; this one answers 404 without a DICOMweb server, 400 to a path that
  would leave the DICOMweb root, 502 when the PACS cannot be reached and 504 when it does not
  answer in time, and forwards the query, fetching in the thread pool (a Google Healthcare
  API token too: MONAI Label's proxy fetched it on the event loop).
- GET /logs/gpu: 404 instead of 500 when there is no nvidia-smi, and nvidia-smi run in the thread
  pool (MONAI Label's ran it on the event loop), at most 30 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import unquote

import requests
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

import monailabel.endpoints.ohif
from lib.endpoints.guard import path_problem
from monailabel.config import RBAC_ADMIN, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import get_mime_type

router = APIRouter()

PROXY_TIMEOUT_S = (10, 120)  # connect, read
GPU_INFO_TIMEOUT_S = 30
PASSED_HEADERS = {"content-type", "etag", "last-modified", "cache-control"}  # the body is sent decoded, whole
OHIF_DIR = os.path.realpath(os.path.join(os.path.dirname(monailabel.endpoints.ohif.__file__), "static", "ohif"))


@router.get("/ohif/{path:path}", include_in_schema=False)
def api_get_ohif(path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    file = os.path.realpath(os.path.join(OHIF_DIR, path))
    if not (file.startswith(OHIF_DIR + os.sep) and os.path.isfile(file)):
        file = os.path.join(OHIF_DIR, "index.html")
    if not os.path.isfile(file):
        raise HTTPException(status_code=404, detail="OHIF is not installed with this MONAI Label")
    return FileResponse(file, media_type=get_mime_type(file))


async def forward(request: Request, op: str, path: str):
    """MONAI Label's proxy, for a DICOMweb datastore and a path that stays under its root."""
    if not settings.MONAI_LABEL_STUDIES.startswith(("http://", "https://")):
        raise HTTPException(status_code=404, detail="this server reads a local datastore: no DICOMweb server to proxy")
    decoded, previous = path, None
    while decoded != previous:  # %252e%252e is `..` once the PACS decodes it too
        previous, decoded = decoded, unquote(decoded)
    if path_problem(decoded):
        raise HTTPException(status_code=400, detail=f"proxy path {path!r} leaves the DICOMweb root")
    url = f"{settings.MONAI_LABEL_STUDIES.rstrip('/')}/{_proxy_path(op, path)}"
    body = await request.body() if request.method == "POST" else None
    headers = {"Accept": request.headers.get("accept", "*/*")}
    if body is not None:
        headers["Content-Type"] = request.headers.get("content-type", "application/dicom")
    auth = _pacs_auth()
    try:
        if "googleapis.com" in settings.MONAI_LABEL_STUDIES:  # Google Healthcare API: a bearer token, as MONAI Label's
            headers["Authorization"] = f"Bearer {await run_in_threadpool(_google_token)}"
            auth = None
        answer = await run_in_threadpool(requests.request, request.method, url, params=list(request.query_params.multi_items()),
                                         data=body, headers=headers, auth=auth, timeout=PROXY_TIMEOUT_S)
    except requests.Timeout as exc:
        raise HTTPException(status_code=504, detail=f"the DICOMweb server did not answer in time: {exc}") from None
    except requests.RequestException as exc:
        raise HTTPException(status_code=502, detail=f"the DICOMweb server did not answer: {exc}") from None
    kept = {name: value for name, value in answer.headers.items() if name.lower() in PASSED_HEADERS}
    return Response(content=answer.content, status_code=answer.status_code, headers=kept)


def _proxy_path(op: str, path: str) -> str:
    """The path on the DICOMweb server, with MONAI Label's WADO/QIDO/STOW prefixes (OHIF asks QIDO
    for series metadata, which is WADO's)."""
    prefixes = {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
                "stow": settings.MONAI_LABEL_STOW_PREFIX}
    prefix = settings.MONAI_LABEL_WADO_PREFIX if op == "qido" and path.endswith("metadata") else prefixes.get(op, "")
    return f"{prefix.strip('/')}/{path}" if prefix else path


def _pacs_auth() -> tuple[str, str] | None:
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    return (user, password) if user and password else None


def _google_token() -> str:
    """An access token from the Google application default credentials (blocking: call in a thread)."""
    import google.auth
    import google.auth.exceptions
    import google.auth.transport.requests

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
    except google.auth.exceptions.GoogleAuthError as exc:
        raise HTTPException(status_code=502, detail=f"no Google Cloud credentials for the DICOMweb server: {exc}") from None
    return credentials.token


def _proxy_route(op: str) -> None:
    prefix = f"/proxy/dicom/{op}/" if op else "/proxy/dicom/"

    async def endpoint(request: Request, path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        return await forward(request, op, path)

    for method in ("GET", "POST"):
        router.add_api_route(prefix + "{path:path}", endpoint, methods=[method], include_in_schema=False)


for _op in ("wado", "qido", "stow", ""):
    _proxy_route(_op)


@router.get("/logs/gpu", tags=["Others"], summary=f"{RBAC_ADMIN}Get GPU Info (nvidia-smi)")
def api_gpu_info(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    if shutil.which("nvidia-smi") is None:
        raise HTTPException(status_code=404, detail="no nvidia-smi on this server (no NVIDIA GPU driver)")
    try:
        done = subprocess.run(["nvidia-smi"], capture_output=True, timeout=GPU_INFO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HTTPException(status_code=504, detail=f"nvidia-smi did not answer in {GPU_INFO_TIMEOUT_S} s") from None
    return Response(content=done.stdout or done.stderr, media_type="text/plain")
