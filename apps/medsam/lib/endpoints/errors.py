"""Which error is answered with which HTTP status: the one table, registered once as FastAPI
exception handlers for every route (the app's and MONAI Label's own).

| raised | status |
| --- | --- |
| `EngineInputError` (the engine refuses the prompt or image), `InvalidId`, `UnreadableFile`, `LabelRejected` | 400 |
| `ImageNotFound`, MONAI Label's `ImageNotFoundException`, `LabelNotFoundException`, and its `INVALID_INPUT` (no such task) | 404 |
| `ImageExists` | 409 |
| `UpstreamError` (the PACS cannot be reached, or refused), `requests` errors from a stock route | 502 |
| `UpstreamTimeout`, `requests.Timeout` | 504 |
| `StorageError` (the disk refused a write) | 507 |

The answer is `{"detail": reason}`. Request validation (FastAPI's 422) is answered as FastAPI does,
except that non-finite numbers in it are written as text: FastAPI echoes the input, and a JSON body
`NaN` (which Python's json reads) made Starlette's JSONResponse fail with a 500.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import requests
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from medsam_engine import EngineInputError

from lib.datastore.errors import (ImageExists, ImageNotFound, InvalidId, LabelRejected, StorageError, UnreadableFile,
                                  UpstreamError, UpstreamTimeout)
from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)

logger = logging.getLogger(__name__)

STATUS: dict[type[BaseException], int] = {
    EngineInputError: 400, InvalidId: 400, LabelRejected: 400, UnreadableFile: 400,
    ImageNotFound: 404, ImageNotFoundException: 404, LabelNotFoundException: 404,
    ImageExists: 409,
    UpstreamError: 502, requests.RequestException: 502,
    UpstreamTimeout: 504, requests.Timeout: 504,
    StorageError: 507,
}
PREFIX = {LabelRejected: "label refused, nothing stored: "}


async def mapped_error(request: Request, exc: Exception) -> JSONResponse:
    """The answer to an exception of a kind in STATUS (the closest class in its MRO decides)."""
    kind = next(cls for cls in type(exc).__mro__ if cls in STATUS)
    status = STATUS[kind]
    detail = str(getattr(exc, "msg", "") or exc)
    if status >= 500:
        logger.warning("%s %s: %d %s", request.method, request.url.path, status, detail)
    return JSONResponse(status_code=status, content={"detail": PREFIX.get(kind, "") + detail})


async def monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    """MONAI Label's own: INVALID_INPUT is its "no such task" (404); the others are server errors."""
    status = 404 if exc.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse(status_code=status, content={"detail": exc.msg})


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by its text ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(exc.errors()))})


def install(app: FastAPI) -> None:
    """Register the handlers above (they take effect when the middleware stack, which holds the
    handlers, is built again)."""
    for kind in STATUS:
        app.add_exception_handler(kind, mapped_error)
    app.add_exception_handler(MONAILabelException, monailabel_error)
    app.add_exception_handler(RequestValidationError, validation_error)
