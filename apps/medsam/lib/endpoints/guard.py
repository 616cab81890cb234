"""Middleware in front of every route: request bodies are size-limited (Starlette's
RequestBodyLimitMiddleware), and URL paths with `.`/`..` segments, backslashes or NUL are refused.

MONAI Label (0.8.5) reads uploads of any size into temporary files, and some of its routes join a
URL path to a folder (/ohif/{path}, /proxy/dicom/{path}, /session/{id}); nothing there is meant to
walk up a folder. The path check is written here (a few lines): no library refuses dot segments.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_MAX_UPLOAD_MB = 1024


def path_problem(path: str) -> str:
    """Why a (decoded) URL path is refused, or "" when it is fine."""
    if "\x00" in path or "\\" in path:
        return "the URL path holds a NUL or a backslash"
    if any(part in (".", "..") for part in path.split("/")):
        return "the URL path holds a '.' or '..' segment"
    return ""


class PathGuard:
    """Answers 400 to a request whose decoded URL path `path_problem` refuses, before any route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = path_problem(scope["path"]) if scope["type"] == "http" else ""
        if problem:
            await JSONResponse({"detail": problem}, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install(app: FastAPI, max_body_bytes: int) -> None:
    """Add the body limit (a 413 once a body passes `max_body_bytes`, by Content-Length or while it
    streams in) and the path guard to the running server's app, inside MONAI Label's CORS middleware
    (so browsers can read their errors). Takes effect when the middleware stack is built again."""
    app.user_middleware += [Middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes), Middleware(PathGuard)]
