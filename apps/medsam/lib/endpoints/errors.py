"""FastAPI's 422 answer for a request that fails validation, kept valid JSON for any input.

FastAPI's own handler echoes the offending input in the answer; a JSON body `NaN` or `Infinity`
(which Python's json reads) then makes Starlette's JSONResponse fail, and the client gets a 500.
Here non-finite numbers in the answer are written as text.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
    """Answer validation errors with the handler above (takes effect when the middleware stack,
    which holds the handlers, is built again)."""
    app.add_exception_handler(RequestValidationError, validation_error)
