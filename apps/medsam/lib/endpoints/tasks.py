"""The app's routes that run a task by name, in place of MONAI Label's own.

MONAI Label's POST /train/{model}, /scoring/{method} and /batch/infer/{model} accept any name and
start a subprocess (which loads the whole app) that fails later; /activelearning/{strategy},
/infer/wsi_v2/{model} and PUT /model/{model} answer 500 to an unknown name or to this app. These
routes answer 404 to a name the app does not have, and otherwise:

- train, scoring, active learning: MONAI Label's own code, run in FastAPI's thread pool (a
  `run_sync` request no longer blocks the server);
- batch and whole-slide inference: 400, since `medsam` segments what a box encloses and has no
  prompt-free or whole-slide mode;
- model upload: 501, since this app's weights come from training or `--conf checkpoint`.

MONAI Label's POST /reload (no role check) drops its cached app, so that the next request builds a
second app and model while the first one's threads keep the old model and caches alive; here it is
refused (501): restart the server to load a changed app.
"""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, HTTPException

from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints.activelearning import sample
from monailabel.endpoints.scoring import run_method
from monailabel.endpoints.train import run_model
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

router = APIRouter()
root = APIRouter()  # MONAI Label serves /reload outside MONAI_LABEL_API_STR


def known(kind: str, name: str, what: str) -> None:
    """404 unless the app's info lists `name` under `kind` (models, trainers, strategies, scoring)."""
    names = app_instance().info().get(kind, {})
    if name not in names:
        raise HTTPException(status_code=404, detail=f"unknown {what} {name!r}; this server has: "
                                                    f"{', '.join(sorted(names)) or 'none'}")


@router.post("/activelearning/{strategy}", tags=["ActiveLearning"],
             summary=f"{RBAC_USER}Run Active Learning strategy to get next sample")
def api_sample(strategy: str, params: Optional[dict] = None,
               user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    known("strategies", strategy, "strategy")
    if params and "strategy" in params:
        raise HTTPException(status_code=400, detail="name the strategy in the URL, not in the body")
    return sample(strategy, params, user.username)


@router.post("/train/{model}", tags=["Train"], summary=f"{RBAC_ADMIN} Run Training Task for specific model")
def api_train(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
              enqueue: Optional[bool] = False, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    known("trainers", model, "trainer")
    return run_model(model, params, run_sync, enqueue)


@router.post("/scoring/{method}", tags=["Scoring"], summary=f"{RBAC_ANNOTATOR}Run Scoring Task for specific method")
def api_score(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    known("scoring", method, "scoring method")
    return run_method(method, params, run_sync)


@router.post("/batch/infer/{model}", tags=["Infer"], summary=f"{RBAC_ADMIN}Run Batch Inference Task")
def api_batch_infer(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    known("models", model, "model")
    raise HTTPException(status_code=400, detail=f"{model!r} segments what a box encloses: send a box per image to "
                                                f"POST /infer/{model}; there is no batch inference")


@router.post("/infer/wsi_v2/{model}", tags=["Infer"], summary=f"{RBAC_USER}Run WSI Inference for supported model")
def api_wsi_infer(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    known("models", model, "model")
    raise HTTPException(status_code=400, detail=f"{model!r} has no whole-slide-image mode: use POST /infer/{model}")


@router.put("/model/{model}", tags=["Model"], summary=f"{RBAC_ADMIN}Upload/Update Model File")
def api_update_model(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    known("models", model, "model")
    raise HTTPException(status_code=501, detail="this server does not take weights by upload: train them "
                                                f"(POST /train/{model}) or start it with --conf checkpoint PATH")


@root.post("/reload", include_in_schema=False)
def api_reload():
    raise HTTPException(status_code=501, detail="this app is not reloaded in place (a second model would load beside "
                                                "the first): restart the server")
