"""The sd-webui-controlnet extension's API, `/controlnet/*` (`scripts/api.py`).

    GET  /controlnet/version         {"version": 2}
    GET  /controlnet/model_list      {"model_list": ["control_v11p_sd15_canny [d14c016b]", ...]}
    GET  /controlnet/module_list     {"module_list": [...], "module_detail": {...}}
    GET  /controlnet/settings        {"control_net_unit_count": 8}
    POST /controlnet/detect          run a preprocessor: {"images": [...], "info": "Success"}

Errors come back in A1111's shape (the app's `SdeksError` handler).
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

from fastapi import APIRouter, Body

from runtime import controlnet, controlnet_units, preprocessors
from runtime.images import decode_image
from runtime.pod import PodDep
from sdeks.errors import InvalidParameterError

router = APIRouter(prefix="/controlnet", tags=["controlnet"])

#: The most images one `/controlnet/detect` call may carry.
MAX_DETECT_IMAGES = 8


@router.get("/version")
async def version() -> dict[str, Any]:
    return {"version": controlnet.API_VERSION}


@router.get("/model_list")
async def model_list(pod: PodDep, update: bool = True) -> dict[str, Any]:
    if update:
        await asyncio.to_thread(pod.models.refresh)
    kind, _ = controlnet.PROVIDER.support(pod.models, pod.settings)
    return {"model_list": controlnet.model_list(pod.models, kind)}


@router.get("/module_list")
async def module_list(alias_names: bool = False) -> dict[str, Any]:
    names = preprocessors.module_list(alias_names)
    details = [p.detail() for p in preprocessors.PREPROCESSORS.values()]
    return {"module_list": names, "module_detail": dict(zip(names, details, strict=True))}


@router.get("/settings")
async def settings() -> dict[str, Any]:
    return {"control_net_unit_count": controlnet_units.MAX_UNITS}


@router.post("/detect")
async def detect(
    pod: PodDep,
    controlnet_module: str = Body("none"),
    controlnet_input_images: list[str] = Body([]),  # noqa: B008
    controlnet_processor_res: int = Body(-1),
    controlnet_threshold_a: float = Body(-1),
    controlnet_threshold_b: float = Body(-1),
    controlnet_masks: list[str] = Body([]),  # noqa: B008
    low_vram: bool = Body(False),
) -> dict[str, Any]:
    preprocessors.get(controlnet_module, "controlnet_module")
    if not controlnet_input_images:
        raise InvalidParameterError("`controlnet_input_images` is empty: no image selected")
    if len(controlnet_input_images) > MAX_DETECT_IMAGES:
        raise InvalidParameterError(
            f"`controlnet_input_images` holds {len(controlnet_input_images)} images, over the "
            f"limit of {MAX_DETECT_IMAGES}"
        )
    _, annotators = controlnet.PROVIDER.support(pod.models, pod.settings)
    limit = pod.settings.max_upscale_pixels

    def run() -> list[str]:
        out = []
        for i, data in enumerate(controlnet_input_images):
            image = decode_image(data, f"controlnet_input_images[{i}]", limit).convert("RGB")
            detected = preprocessors.detect(
                image,
                controlnet_module,
                processor_res=controlnet_processor_res,
                threshold_a=controlnet_threshold_a,
                threshold_b=controlnet_threshold_b,
                annotators=annotators,
                where="controlnet_module",
            )
            buf = io.BytesIO()
            detected.image.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return out

    async with pod.slots:
        images = await asyncio.to_thread(run)
    return {"images": images, "info": "Success"}
