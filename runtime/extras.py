"""`/sdapi/v1/extra-single-image` and the `extra-single-image` task: upscale one image.

check the upscalers -> decode -> target size -> upscaler 1 (+ blended upscaler 2) -> infotext
"""

from __future__ import annotations

import time
from typing import Any

from PIL import Image

from runtime.a1111 import ExtrasSingleImageRequest
from runtime.images import decode_image
from runtime.settings import RuntimeSettings
from runtime.stages.types import RenderResult
from runtime.upscalers import check_upscaler, upscale_image
from sdeks.errors import InvalidParameterError


def render_extras(
    models: Any, settings: RuntimeSettings, request: ExtrasSingleImageRequest
) -> RenderResult:
    """Resize with the upscalers `upscaler_1` (and `upscaler_2`, blended in)."""
    for name in ("upscaler_1", "upscaler_2"):
        check_upscaler(models, getattr(request, name), name)
    image = decode_image(request.image, "image", settings.max_upscale_pixels).convert("RGB")
    if request.resize_mode == 1:
        width, height = request.upscaling_resize_w, request.upscaling_resize_h
        scale_text = f"{width}x{height}"
    else:
        if not 0 < request.upscaling_resize <= 8:
            raise InvalidParameterError(
                f"`upscaling_resize` must be between 0 and 8, got {request.upscaling_resize}"
            )
        width = round(image.width * request.upscaling_resize)
        height = round(image.height * request.upscaling_resize)
        scale_text = f"{request.upscaling_resize:g}"
    if width < 1 or height < 1 or width * height > settings.max_upscale_pixels:
        raise InvalidParameterError(
            f"upscaled size {width}x{height} is outside 1..{settings.max_upscale_pixels} pixels"
        )
    crop = request.resize_mode == 1 and request.upscaling_crop
    start = time.perf_counter()
    result = upscale_image(models, image, request.upscaler_1, width, height, crop=crop)
    if request.upscaler_2 != "None" and request.extras_upscaler_2_visibility > 0:
        second = upscale_image(models, image, request.upscaler_2, width, height, crop=crop)
        result = Image.blend(result, second, min(1.0, request.extras_upscaler_2_visibility))
    params = {"Postprocess upscale by": scale_text, "Postprocess upscaler": request.upscaler_1}
    if request.upscaler_2 != "None":
        params["Postprocess upscaler 2"] = request.upscaler_2
    text = ", ".join(f"{k}: {v}" for k, v in params.items())
    return RenderResult(
        images=[result],
        infotexts=[text],
        info={"html_info": text, "width": width, "height": height, "infotexts": [text]},
        parameters=request.model_dump(exclude={"image"}),
        inference_ms=int((time.perf_counter() - start) * 1000),
    )
