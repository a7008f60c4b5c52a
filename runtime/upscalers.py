"""Image upscalers by A1111 name: what `hr_upscaler`, `upscaler_1/2` and SD upscale call.

Every caller goes through `upscale_image(models, image, name, width, height)`,
so an upscaler is usable by hires fix, extras and the SD upscale script at
once. Two sorts:

- the built-in resamplers "None" (Lanczos, as A1111's "None" upscaler
  resizes with PIL), "Lanczos" and "Nearest";
- model upscalers from the models bucket (`runtime.upscaler_models`:
  ESRGAN/, RealESRGAN/, SwinIR/, DAT/, ... loaded with spandrel, held in the
  model store's tiers, run in tiles of A1111's `ESRGAN_tile` option).

An unknown name fails with an error naming the field and listing what exists;
"LDSR" is refused by name (a diffusion upscaler, not a spandrel model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image, ImageOps

from runtime import upscaler_models as um

#: The built-in upscalers, in A1111's order (`/sdapi/v1/upscalers`).
UPSCALERS = ("None", "Lanczos", "Nearest")
_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def _models_of(models: Any) -> list[um.UpscalerInfo]:
    if models is None or not hasattr(models, "entries"):
        return []
    return um.available(models.entries(um.UPSCALER))


def available(models: Any = None) -> list[str]:
    """The upscaler names a request may use, in `/sdapi/v1/upscalers` order."""
    return [*UPSCALERS, *(info.name for info in _models_of(models))]


def items(models: Any) -> list[dict[str, Any]]:
    """`/sdapi/v1/upscalers` items (A1111's fields)."""
    source = getattr(getattr(models, "source", None), "url", "")
    builtin = [
        {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
        for n in UPSCALERS
    ]
    return builtin + [info.item(source) for info in _models_of(models)]


def check_upscaler(models: Any, name: str, field_name: str) -> None:
    """Refuse an upscaler name that is not installed, listing those that are."""
    if not isinstance(name, str):
        from sdeks.errors import InvalidParameterError

        raise InvalidParameterError(f"`{field_name}` must be an upscaler name, got {name!r:.80}")
    if name in UPSCALERS:
        return
    if um.find([i.entry for i in _models_of(models)], name) is None:
        raise um.unknown_upscaler(field_name, name, available(models))


def upscale_image(
    models: Any,
    image: Image.Image,
    name: str,
    width: int,
    height: int,
    *,
    crop: bool = False,
    options: Mapping[str, Any] | None = None,
    check: Callable[[], None] | None = None,
    field_name: str = "upscaler",
) -> Image.Image:
    """`image` upscaled by upscaler `name` to exactly `width` x `height`.

    `crop`: fill the target size and cut the overflow (extras `upscaling_crop`)
    instead of stretching. `options`: the A1111 options in force (`ESRGAN_tile`,
    `ESRGAN_tile_overlap`). `check` runs between tiles (cancellation).
    """
    if name in UPSCALERS:
        resample = _RESAMPLE.get(name, Image.Resampling.LANCZOS)
        if crop:
            return ImageOps.fit(image, (width, height), resample)
        return image.resize((width, height), resample)
    entry = um.find([i.entry for i in _models_of(models)], name)
    if entry is None:
        raise um.unknown_upscaler(field_name, name, available(models))
    tile, overlap = um.tile_options(options or {})
    # Crop: upscale to cover the target, then cut the centre (A1111's extras crop).
    cover = max(width / image.width, height / image.height)
    out_w, out_h = (
        (max(width, round(image.width * cover)), max(height, round(image.height * cover)))
        if crop
        else (width, height)
    )
    with models.use_weights(um.UPSCALER, entry) as lease:
        result = um.upscale_with(
            lease.model,
            image,
            out_w,
            out_h,
            tile=tile,
            overlap=overlap,
            check=check,
            field_name=field_name,
            name=name,
        )
    if crop and result.size != (width, height):
        result = ImageOps.fit(result, (width, height), Image.Resampling.LANCZOS)
    return result
