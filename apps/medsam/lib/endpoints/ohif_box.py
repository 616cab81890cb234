"""GET /ohif/app-config.js: OHIF's own configuration followed by the MedSAM box tool
(apps/medsam/ohif/medsam-box.js), so that OHIF, which cannot be rebuilt here, loads the tool with the
page. The script waits for OHIF's cornerstone3D and MONAI Label panel and does nothing else when it
cannot find them."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import Response

import monailabel.endpoints.ohif
from lib.endpoints import replace_routes
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

router = APIRouter()

APP_CONFIG = Path(os.path.dirname(monailabel.endpoints.ohif.__file__), "static", "ohif", "app-config.js")
BOX_SCRIPT = Path(__file__).resolve().parents[2] / "ohif" / "medsam-box.js"


@router.get("/ohif/app-config.js", include_in_schema=False)
def api_get_ohif_config(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    if not APP_CONFIG.is_file():
        raise HTTPException(status_code=404, detail="OHIF is not installed with this MONAI Label")
    script = f"{APP_CONFIG.read_text()}\n;\n{BOX_SCRIPT.read_text()}"
    return Response(content=script, media_type="application/javascript", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI | None = None) -> bool:
    """Serve this route in place of the OHIF folder's app-config.js (install after lib.endpoints.files,
    whose /ohif/{path} would otherwise answer first)."""
    return replace_routes(router, app)
