"""Routes of this app that replace MONAI Label's own (to answer 4xx instead of 500, among others)."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.routing import APIRoute

logger = logging.getLogger(__name__)

# Ids a client may name (image, label tag): one file name, no path. Hand-written: no library checks this.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def server_app() -> FastAPI | None:
    """The running MONAI Label server's FastAPI app (None in the CLI or a train subprocess)."""
    module = sys.modules.get("monailabel.app")
    return None if module is None else module.app


def _route_lists(app: FastAPI) -> list[tuple[str, list]]:
    """(prefix, route list) pairs that may hold MONAI Label's routes: the app's own list and, where
    FastAPI keeps an included router by reference (its `_IncludedRouter`, FastAPI 0.16x), that
    router's list, whose paths lack the include prefix."""
    lists: list[tuple[str, list]] = [("", app.router.routes)]
    for entry in app.router.routes:
        original = getattr(entry, "original_router", None)
        if original is not None:
            lists.append((getattr(getattr(entry, "include_context", None), "prefix", ""), original.routes))
    return lists


def replace_routes(router: APIRouter, app: FastAPI | None = None) -> bool:
    """Put each of `router`'s routes in place of the running server's routes with the same path and
    method: those are removed, ours go first, in their order (Starlette takes the first match).

    Ours are rebuilt bound to the app, so they see its `dependency_overrides` (see lib.endpoints.auth),
    as the routes MONAI Label includes do. Routes are looked up per request, so this takes effect at
    once. Returns False when no MONAI Label server app is loaded (the CLI, a train subprocess).
    """
    app = app or server_app()
    if app is None:
        return False
    bound = []
    for ours in router.routes:
        assert isinstance(ours, APIRoute)
        for prefix, routes in _route_lists(app):
            routes[:] = [r for r in routes if not (isinstance(r, APIRoute) and prefix + r.path == ours.path
                                                   and r.methods & ours.methods)]
        bound.append(APIRoute(
            ours.path, ours.endpoint, methods=ours.methods, name=ours.name, summary=ours.summary, tags=ours.tags,
            include_in_schema=ours.include_in_schema, deprecated=ours.deprecated, response_model=ours.response_model,
            dependency_overrides_provider=app))
        logger.info("MedSAM app: %s %s served by %s", ",".join(sorted(ours.methods)), ours.path,
                    ours.endpoint.__module__)
    app.router.routes[:0] = bound  # in the router's order: /proxy/dicom/qido/{path} before /proxy/dicom/{path}
    app.openapi_schema = None
    return True


def json_object(text: str, field: str = "params") -> dict[str, Any]:
    """A form field holding a JSON object (empty means {}); anything else is a 400."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(status_code=400, detail=f"{field} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def safe_id(value: str, field: str) -> str:
    """`value` when it is a plain name (letters, digits, `_.-`, not `..`), else a 400: ids become
    file names in the datastore, and no client-given name may lead out of it."""
    if not SAFE_ID.fullmatch(value) or ".." in value:
        raise HTTPException(status_code=400, detail=f"{field} {value!r} is not a valid id: use letters, digits "
                                                    "and _ . - (no path, at most 200 characters)")
    return value
