"""Middleware in front of every route: request bodies are size-limited (Starlette's
RequestBodyLimitMiddleware), URL paths with `.`/`..` segments, backslashes or NUL are refused, and
other hosts are refused unless the admin allows them (`--conf allow_remote true`).

`monailabel start_server` binds 0.0.0.0 unless told `--host`; `main.py serve` binds 127.0.0.1. So
that a server started either way serves only this machine until the admin opens it, requests from
non-loopback addresses get 403 by default (a few lines: no library offers a client-address check).

MONAI Label (0.8.5) reads uploads of any size into temporary files, and some of its routes join a
URL path to a folder (/ohif/{path}, /proxy/dicom/{path}, /session/{id}); nothing there is meant to
walk up a folder. The path check is written here (a few lines): no library refuses dot segments.
"""

from __future__ import annotations

import ipaddress

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


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine's loopback (127.0.0.0/8, ::1, IPv4-mapped)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class LoopbackOnly:
    """Answers 403 to a request from another host (the ASGI scope's client address)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not is_loopback((scope.get("client") or ("",))[0]):
            detail = "this server only serves its own machine; the admin opens it with --conf allow_remote true"
            await JSONResponse({"detail": detail}, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install(app: FastAPI, max_body_bytes: int, allow_remote: bool = False) -> None:
    """Add the body limit (a 413 once a body passes `max_body_bytes`, by Content-Length or while it
    streams in), the path guard and, unless `allow_remote`, the loopback check to the running
    server's app, inside MONAI Label's CORS middleware (so browsers can read their errors). Takes
    effect when the middleware stack is built again."""
    middleware = [Middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes), Middleware(PathGuard)]
    if not allow_remote:
        middleware.insert(0, Middleware(LoopbackOnly))
    app.user_middleware += middleware
