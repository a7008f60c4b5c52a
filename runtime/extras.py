"""A1111's extras: `/sdapi/v1/extra-single-image`, `/sdapi/v1/extra-batch-images` and
the `extra-single-image` / `extra-batch-images` tasks.

    check every field -> decode each image -> per image: face restoration (GFPGAN, then
    CodeFormer, each blended by its visibility) and upscaling (upscaler 1, upscaler 2
    blended in by `extras_upscaler_2_visibility`), in A1111's order -> infotext

`upscale_first` runs the upscaling before the face restoration. Sizes follow
A1111's `scripts_postprocessing_upscale`: `resize_mode` 0 scales by
`upscaling_resize`; 1 scales by max(`upscaling_resize_w` / width,
`upscaling_resize_h` / height), keeping the aspect ratio, and with
`upscaling_crop` cuts the centre to exactly `upscaling_resize_w` x `_h`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps

from runtime import face_restoration
from runtime.a1111 import ExtrasBaseRequest, ExtrasBatchImagesRequest, ExtrasSingleImageRequest
from runtime.images import decode_image
from runtime.settings import RuntimeSettings
from runtime.stages.types import RenderResult
from runtime.upscalers import check_upscaler, upscale_image
from sdeks.errors import InvalidParameterError

#: Images one `/extra-batch-images` request may hold.
MAX_BATCH_IMAGES = 64


def _fraction(request: ExtrasBaseRequest, name: str) -> float:
    value = getattr(request, name)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidParameterError(f"`{name}` must be between 0 and 1, got {value}")
    return float(value)


def check_extras(models: Any, settings: RuntimeSettings, request: ExtrasBaseRequest) -> None:
    """Refuse what cannot be done, before any image is decoded or model loaded."""
    for name in ("upscaler_1", "upscaler_2"):
        check_upscaler(models, getattr(request, name), name)
    if request.resize_mode not in (0, 1):
        raise InvalidParameterError(f"`resize_mode` must be 0 or 1, got {request.resize_mode}")
    if request.resize_mode == 0:
        value = request.upscaling_resize
        if not math.isfinite(value) or not 0 < value <= 8:
            raise InvalidParameterError(f"`upscaling_resize` must be between 0 and 8, got {value}")
    else:
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            value = getattr(request, name)
            if not 1 <= value <= 16384:
                raise InvalidParameterError(f"`{name}` must be between 1 and 16384, got {value}")
    for name in ("extras_upscaler_2_visibility", "gfpgan_visibility", "codeformer_visibility"):
        _fraction(request, name)
    _fraction(request, "codeformer_weight")
    if request.gfpgan_visibility > 0:
        face_restoration.check_restorer(models, "GFPGAN", "gfpgan_visibility")
    if request.codeformer_visibility > 0:
        face_restoration.check_restorer(models, "CodeFormer", "codeformer_visibility")


def _target(request: ExtrasBaseRequest, image: Image.Image) -> tuple[int, int, float, str]:
    """(width, height) to upscale to, the factor, and the infotext's size field."""
    if request.resize_mode == 1:
        w, h = request.upscaling_resize_w, request.upscaling_resize_h
        factor = max(w / image.width, h / image.height)
        text = f"Postprocess upscale to: {w}x{h}"
    else:
        factor = request.upscaling_resize
        text = f"Postprocess upscale by: {factor:g}"
    return round(image.width * factor), round(image.height * factor), factor, text


def process_image(
    models: Any,
    settings: RuntimeSettings,
    request: ExtrasBaseRequest,
    image: Image.Image,
    *,
    options: Any = None,
    check: Callable[[], None] | None = None,
) -> tuple[Image.Image, str]:
    """One image through the extras operations; returns it and its infotext."""
    width, height, factor, size_text = _target(request, image)
    if width < 1 or height < 1 or width * height > settings.max_upscale_pixels:
        raise InvalidParameterError(
            f"upscaled size {width}x{height} is outside 1..{settings.max_upscale_pixels} pixels"
        )
    params: list[str] = []

    def faces(img: Image.Image) -> Image.Image:
        if request.gfpgan_visibility > 0:
            restored = face_restoration.restore(models, img, "GFPGAN", check=check)
            img = Image.blend(img, restored, request.gfpgan_visibility)
            params.append(f"GFPGAN visibility: {request.gfpgan_visibility:g}")
        if request.codeformer_visibility > 0:
            restored = face_restoration.restore(
                models, img, "CodeFormer", weight=request.codeformer_weight, check=check
            )
            img = Image.blend(img, restored, request.codeformer_visibility)
            params.append(
                f"CodeFormer visibility: {request.codeformer_visibility:g}, "
                f"CodeFormer weight: {request.codeformer_weight:g}"
            )
        return img

    def upscale(img: Image.Image) -> Image.Image:
        if factor == 1 and request.upscaler_1 == "None" and request.upscaler_2 == "None":
            return img
        w, h = round(img.width * factor), round(img.height * factor)
        result = upscale_image(
            models,
            img,
            request.upscaler_1,
            w,
            h,
            options=options,
            check=check,
            field_name="upscaler_1",
        )
        if request.upscaler_2 != "None" and request.extras_upscaler_2_visibility > 0:
            second = upscale_image(
                models,
                img,
                request.upscaler_2,
                w,
                h,
                options=options,
                check=check,
                field_name="upscaler_2",
            )
            result = Image.blend(result, second, request.extras_upscaler_2_visibility)
        if request.resize_mode == 1 and request.upscaling_crop:
            crop = (request.upscaling_resize_w, request.upscaling_resize_h)
            result = ImageOps.fit(result, crop, Image.Resampling.LANCZOS)
        params.append(f"{size_text}, Postprocess upscaler: {request.upscaler_1}")
        if request.upscaler_2 != "None":
            params.append(
                f"Postprocess upscaler 2: {request.upscaler_2}, "
                f"Postprocess upscaler 2 visibility: {request.extras_upscaler_2_visibility:g}"
            )
        return result

    steps = (upscale, faces) if request.upscale_first else (faces, upscale)
    for step in steps:
        if check is not None:
            check()
        image = step(image)
    return image, ", ".join(params)


def render_extras(
    models: Any,
    settings: RuntimeSettings,
    request: ExtrasSingleImageRequest | ExtrasBatchImagesRequest,
    *,
    options: Any = None,
    check: Callable[[], None] | None = None,
) -> RenderResult:
    """Every image of the request through `process_image`, one result image per input."""
    check_extras(models, settings, request)
    if isinstance(request, ExtrasBatchImagesRequest):
        if not request.imageList:
            raise InvalidParameterError("`imageList` must hold at least one image")
        if len(request.imageList) > MAX_BATCH_IMAGES:
            raise InvalidParameterError(
                f"`imageList` holds {len(request.imageList)} images, over the limit of "
                f"{MAX_BATCH_IMAGES}"
            )
        sources = [(f.data, f"imageList.{i}.data") for i, f in enumerate(request.imageList)]
        exclude = {"imageList"}
    else:
        sources = [(request.image, "image")]
        exclude = {"image"}
    # Decode (and size-check) every image before any model work.
    images = [
        decode_image(data, field, settings.max_upscale_pixels).convert("RGB")
        for data, field in sources
    ]
    start = time.perf_counter()
    results, texts = [], []
    for image in images:
        out, text = process_image(models, settings, request, image, options=options, check=check)
        results.append(out)
        texts.append(text)
    first = results[0]
    return RenderResult(
        images=results,
        infotexts=texts,
        info={
            "html_info": texts[0],
            "width": first.width,
            "height": first.height,
            "infotexts": texts,
        },
        parameters=request.model_dump(exclude=exclude),
        inference_ms=int((time.perf_counter() - start) * 1000),
    )
