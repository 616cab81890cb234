"""Routes of this app that replace MONAI Label's own (to answer 4xx instead of 500, among others)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.routing import APIRoute

logger = logging.getLogger(__name__)


def replace_route(router: APIRouter, method: str, app: FastAPI | None = None) -> bool:
    """Put `router`'s one route in place of the running server's route with the same path and method.

    Routes are looked up per request, so swapping one after start-up takes effect at once.
    Returns False when no MONAI Label server app is loaded (e.g. the CLI or a train subprocess).
    """
    if app is None:
        module = sys.modules.get("monailabel.app")
        if module is None:
            return False
        app = module.app
    ours = router.routes[0]
    routes = app.router.routes
    for i, route in enumerate(routes):
        if isinstance(route, APIRoute) and route.path == ours.path and method in route.methods:
            routes[i] = ours
            break
    else:
        routes.insert(0, ours)
    app.openapi_schema = None
    logger.info("MedSAM app: %s %s served by %s", method, ours.path, ours.endpoint.__module__)
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
