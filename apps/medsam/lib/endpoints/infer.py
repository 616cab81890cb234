"""The app's POST /infer/{model}, put in place of MONAI Label's own when the server starts.

MONAI Label's route (monailabel/endpoints/infer.py) answers 500 to malformed `params` and to any
exception a task raises, reads an image id that happens to be an existing path on the server as
that file, and runs the inference inside an `async` handler, which blocks the event loop. This
route keeps its interface and its parts (the app's `infer`, sessions, `send_response`) but:

- takes the parameters as the multipart field `params` (as Slicer and OHIF send them) or as a
  JSON body (`Content-Type: application/json`, as a script would), checked by `InferParams`;
- resolves image ids through the datastore only (an upload or a session is the way to send a file),
  and session ids only as ids of the session store (`check_session_id`);
- answers 400 to `output=dicom_seg` before running anything: no task of this app makes a DICOM SEG
  result (MONAI Label answered 500 after the inference, leaving the result file behind);
- reads no uploaded file whose header declares an absurd size (`check_header`), and removes an
  uploaded file when the request ends, failed or not (MONAI Label's background task, which runs
  only after a reply, left it in the temporary folder whenever inference failed);
- is a plain function, which FastAPI runs in its thread pool: the server keeps answering.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any, Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.background import BackgroundTasks

from lib.datastore import series_modality
from lib.endpoints.datastore import image_uri
from lib.endpoints.params import InferParams, parse
from lib.endpoints.session import check_session_id
from lib.endpoints.tasks import known
from lib.datastore.checks import check_header
from lib.endpoints.uploads import saved
from lib.infers.medsam import MODEL_PARAM
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.utils.app import app_instance

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/infer", tags=["Infer"])


async def infer_params(request: Request, params: str = Form("{}")) -> dict[str, Any]:
    """The request's parameters: the form field `params`, or the body when it is JSON. Their
    `model` (the engine model) is renamed, since MONAI Label's request uses `model` for the task;
    `image` may only come from the query."""
    is_json = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
    values = parse(await request.body() if is_json else params, InferParams)
    if "image" in values:
        raise HTTPException(status_code=400, detail="params may not set `image`: pass ?image=<id>, a file or a session")
    if "model" in values:
        values[MODEL_PARAM] = values.pop("model")
    return values


def resolve_image(instance: MONAILabelApp, image: str, session_id: str, file: UploadFile | None,
                  files: ExitStack) -> str:
    """The server path of the image to segment: an upload (kept until `files` closes), a session's
    image, or a datastore id."""
    if file:
        path = files.enter_context(saved(file))
        check_header(path)
        return str(path)
    if session_id:
        session = instance.sessions().get_session(check_session_id(session_id)) if instance.sessions() else None
        if not session:
            raise HTTPException(status_code=404, detail=f"unknown session {session_id!r} (expired or never created)")
        return session.image
    if not image:
        raise HTTPException(status_code=400, detail="no image: pass ?image=<id>, a file or a session_id")
    return image_uri(image)


@router.post("/{model}", summary=f"{RBAC_USER}Run Inference for supported model")
def api_run_inference(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: dict = Depends(infer_params),
    file: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    if output == ResultType.dicom_seg:
        raise HTTPException(status_code=400, detail="output=dicom_seg is not supported by this app: use image, json "
                                                    "or all (save a label to store it as DICOM SEG)")
    known("models", model, "model")
    instance: MONAILabelApp = app_instance()
    request = {**params, "model": model}
    with ExitStack() as files:  # an uploaded image is removed once inference is done, failed or not
        request["image"] = resolve_image(instance, image, session_id, file, files)
        if image and not file and not session_id and not request.get("modality"):
            request["modality"] = series_modality(instance.datastore(), image)  # a DICOM series' own Modality
        logger.info("Infer Request: %s", request)
        result = instance.infer(request)
    return send_response(instance.datastore(), result, output, background_tasks)
