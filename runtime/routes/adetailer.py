"""The ADetailer extension's API, `/adetailer/v1/*` (its `scripts/!adetailer.py` routes).

    GET /adetailer/v1/version    {"version": "sdeks"}
    GET /adetailer/v1/schema     the JSON schema of one detector pass (`ADetailerArgs`)
    GET /adetailer/v1/ad_model   {"ad_model": ["face_yolov8n.pt", ...]}: the detectors
                                 under `adetailer/` in the models bucket, by the names
                                 clients send (a `.pt2` export is listed as its `.pt`)

Clients call these to fill their detector menus and to check that the
extension is there before sending `alwayson_scripts.ADetailer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter

from runtime import adetailer, detectors
from runtime.pod import PodDep

router = APIRouter(prefix="/adetailer/v1", tags=["adetailer"])

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


@router.get("/version")
async def version() -> dict[str, Any]:
    return {"version": adetailer.VERSION}


@router.get("/schema")
async def schema() -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(adetailer.ADetailerArgs):
        default = f.default
        prop: dict[str, Any] = {"title": f.name.replace("_", " ").title(), "default": default}
        kind = _JSON_TYPES.get(type(default))
        if kind is not None:
            prop["type"] = kind
        properties[f.name] = prop
    return {"title": "ADetailerArgs", "type": "object", "properties": properties}


@router.get("/ad_model")
async def ad_model(pod: PodDep) -> dict[str, Any]:
    await asyncio.to_thread(pod.models.refresh)
    names = [detectors.display_name(e) for e in pod.models.entries(detectors.DETECTOR)]
    return {"ad_model": list(dict.fromkeys(names))}
