"""GET /ohif/app-config.js: OHIF's own configuration followed by the MedSAM box tool
(apps/medsam/ohif/medsam-box.js), so that OHIF, which cannot be rebuilt here, loads the tool with the
page. The script waits for OHIF's cornerstone3D and MONAI Label panel and does nothing else when it
cannot find them. It is written for the OHIF build monailabel 0.8.5 bundles (OHIF_BUILD); another
build gets a warning in the server log."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import Response

import monailabel.endpoints.ohif
from lib.endpoints import replace_routes
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

logger = logging.getLogger(__name__)
router = APIRouter()

OHIF_DIR = Path(os.path.dirname(monailabel.endpoints.ohif.__file__), "static", "ohif")
APP_CONFIG = OHIF_DIR / "app-config.js"
BOX_SCRIPT = Path(__file__).resolve().parents[2] / "ohif" / "medsam-box.js"
OHIF_BUILD = ("3.10.0-beta.5", "32fe2623cfb5129a19ee07031dd50e79b530c7e0")  # version, commit


def ohif_build() -> tuple[str, str] | None:
    """(version, commit) of the served OHIF, from its app bundle; None when not found."""
    for bundle in OHIF_DIR.glob("app.bundle.*.js"):
        text = bundle.read_text(errors="replace")
        version = re.search(r'versionNumber = "([^"]+)"', text)
        commit = re.search(r'commitHash = "([0-9a-f]+)"', text)
        if version and commit:
            return version.group(1), commit.group(1)
    return None


@router.get("/ohif/app-config.js", include_in_schema=False)
def api_get_ohif_config(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    if not APP_CONFIG.is_file():
        raise HTTPException(status_code=404, detail="OHIF is not installed with this MONAI Label")
    script = f"{APP_CONFIG.read_text()}\n;\n{BOX_SCRIPT.read_text()}"
    return Response(content=script, media_type="application/javascript", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI | None = None) -> bool:
    """Serve this route in place of the OHIF folder's app-config.js (install after lib.endpoints.files,
    whose /ohif/{path} would otherwise answer first)."""
    served = ohif_build()
    if served != OHIF_BUILD:
        logger.warning("MedSAM box prompts: written for OHIF %s (%s), this MONAI Label serves %s; the browser "
                       "console says whether they are on", *OHIF_BUILD, served)
    return replace_routes(router, app)
