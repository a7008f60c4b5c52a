"""Image upscalers by A1111 name: what `hr_upscaler`, `upscaler_1/2` and SD upscale call.

Every caller goes through `upscale_image(models, image, name, width, height)`,
so an upscaler added here is usable by hires fix, extras and the SD upscale
script at once. Today: the built-in resamplers "None" (Lanczos, as A1111's
"None" upscaler resizes with PIL), "Lanczos" and "Nearest".
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps

from sdeks.errors import InvalidParameterError

#: The built-in upscalers, in A1111's order (`/sdapi/v1/upscalers`).
UPSCALERS = ("None", "Lanczos", "Nearest")
_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def available(models: Any = None) -> list[str]:
    """The upscaler names a request may use, in `/sdapi/v1/upscalers` order."""
    return list(UPSCALERS)


def check_upscaler(models: Any, name: str, field_name: str) -> None:
    """Refuse an upscaler name that is not installed, listing those that are."""
    names = available(models)
    if name not in names:
        raise InvalidParameterError(
            f"`{field_name}` {name!r} is not installed; available upscalers: {', '.join(names)}"
        )


def upscale_image(
    models: Any, image: Image.Image, name: str, width: int, height: int, *, crop: bool = False
) -> Image.Image:
    """`image` upscaled by upscaler `name` to exactly `width` x `height`.

    `crop`: fill the target size and cut the overflow (extras `upscaling_crop`)
    instead of stretching.
    """
    resample = _RESAMPLE.get(name, Image.Resampling.LANCZOS)
    if crop:
        return ImageOps.fit(image, (width, height), resample)
    return image.resize((width, height), resample)
