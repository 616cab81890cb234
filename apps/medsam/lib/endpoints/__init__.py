"""Routes of this app that replace MONAI Label's own (to answer 4xx instead of 500, among others)."""

from __future__ import annotations

import logging
import sys

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from monailabel.config import settings

logger = logging.getLogger(__name__)


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


def replace_routes(router: APIRouter, app: FastAPI | None = None, prefix: str | None = None) -> bool:
    """Put each of `router`'s routes, under `prefix` (MONAI_LABEL_API_STR, where MONAI Label
    includes its own routers), in place of the running server's routes with the same path and
    method: those are removed, ours go first, in their order (Starlette takes the first match).

    Ours are rebuilt bound to the app, so they see its `dependency_overrides` (see lib.endpoints.auth),
    as the routes MONAI Label includes do. Routes are looked up per request, so this takes effect at
    once. Returns False when no MONAI Label server app is loaded (the CLI, a train subprocess).
    """
    app = app or server_app()
    if app is None:
        return False
    prefix = settings.MONAI_LABEL_API_STR if prefix is None else prefix
    bound = []
    for ours in router.routes:
        assert isinstance(ours, APIRoute)
        path = prefix + ours.path
        for included, routes in _route_lists(app):
            routes[:] = [r for r in routes if not (isinstance(r, APIRoute) and included + r.path == path
                                                   and r.methods & ours.methods)]
        bound.append(APIRoute(
            path, ours.endpoint, methods=ours.methods, name=ours.name, summary=ours.summary, tags=ours.tags,
            include_in_schema=ours.include_in_schema, deprecated=ours.deprecated, response_model=ours.response_model,
            dependency_overrides_provider=app))
        logger.info("MedSAM app: %s %s served by %s", ",".join(sorted(ours.methods)), path,
                    ours.endpoint.__module__)
    app.router.routes[:0] = bound  # in the router's order: /proxy/dicom/qido/{path} before /proxy/dicom/{path}
    app.openapi_schema = None
    return True
