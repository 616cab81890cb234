"""An ASGI middleware in front of every route: request bodies are size-limited, and URL paths with
`.`/`..` segments, backslashes or NUL are refused.

MONAI Label (0.8.5) reads uploads of any size into temporary files, and some of its routes join a
URL path to a folder (/ohif/{path}, /proxy/dicom/{path}, /session/{id}); nothing there is meant to
walk up a folder. Written here (a few lines) because Starlette and FastAPI offer no body limit.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_UPLOAD_MB = 1024


def path_problem(path: str) -> str:
    """Why a (decoded) URL path is refused, or "" when it is fine."""
    if "\x00" in path or "\\" in path:
        return "the URL path holds a NUL or a backslash"
    if any(part in (".", "..") for part in path.split("/")):
        return "the URL path holds a '.' or '..' segment"
    return ""


class RequestGuard:
    """Answers 400 to a refused path and 413 to a body over `max_body_bytes`, before any route runs
    (by Content-Length), or while the body is read (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> str:
        return (f"request body larger than this server's upload limit of {self.max_body_bytes >> 20} MB "
                "(--conf max_upload_mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = path_problem(scope["path"])
        length = Headers(scope=scope).get("content-length")
        if not problem and length is not None:
            if not length.isdigit():
                problem = f"Content-Length {length!r} is not a number"
            elif int(length) > self.max_body_bytes:
                await JSONResponse({"detail": self._too_large()}, status_code=413)(scope, receive, send)
                return
        if problem:
            await JSONResponse({"detail": problem}, status_code=400)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # FastAPI re-raises an HTTPException met while parsing the body: the client gets a 413.
                    raise HTTPException(status_code=413, detail=self._too_large())
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI, max_body_bytes: int) -> None:
    """Add the guard to the running server's app, inside MONAI Label's CORS middleware (so browsers
    can read its errors). Starlette builds the middleware stack at start-up, hence the rebuild."""
    app.user_middleware.append(Middleware(RequestGuard, max_body_bytes=max_body_bytes))
    app.middleware_stack = app.build_middleware_stack()
