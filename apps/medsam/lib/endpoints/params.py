"""The JSON parameters routes take in a form field (or, for /infer, a JSON body), each declared once
as a pydantic schema: type-checked, with a 400 naming the parameter that is wrong.

Query and path parameters are declared in the routes' signatures (FastAPI checks them: 422 naming
the parameter). What a value means (a box inside the image, a known CT window) is the engine's
check (`EngineInputError`, 400).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError


class Params(BaseModel):
    """Any JSON object: clients add fields of their own (Slicer's `client_id`...), kept as given."""

    model_config = ConfigDict(extra="allow")


class InferParams(Params):
    """POST /infer/{model}: the prompt and output options (see lib/infers/prompts.py, output.py)."""

    boxes: Optional[list] = None
    roi: Optional[list] = None
    foreground: Optional[list] = None
    background: Optional[list] = None
    label: Optional[StrictStr] = None
    model: Optional[StrictStr] = None  # the engine model (medsam-lite, medsam-vit-b)
    modality: Optional[StrictStr] = None
    window: Optional[StrictStr] = None
    result_extension: Optional[StrictStr] = None
    result_dtype: Optional[StrictStr] = None
    result_compress: Optional[bool] = None
    restore_label_idx: Optional[bool] = None


class LabelParams(Params):
    """PUT /datastore/label: the segments' names, as Slicer (`label_info`) or the infer reply
    (`label_names`) gives them."""

    label_info: Optional[list[dict[str, Any]]] = None
    label_names: Optional[dict[str, Any]] = None


def parse(text: str | bytes, schema: type[Params] = Params, field: str = "params") -> dict[str, Any]:
    """The JSON object in `text` (empty means {}), checked against `schema`: else a 400 naming the
    field and the parameter in it."""
    try:
        value = json.loads(text) if text else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(status_code=400, detail=f"{field} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail=f"{field} must be a JSON object, got {type(value).__name__}")
    try:
        checked = schema.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, (field, *e['loc'])))}: {e['msg']}" for e in exc.errors())
        raise HTTPException(status_code=400, detail=problems) from None
    return checked.model_dump(exclude_unset=True)
