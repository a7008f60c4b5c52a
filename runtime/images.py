"""Image helpers shared by the render stages and the routes: decode, encode, resize, fill.

Pure PIL: no torch.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, ImageFilter, ImageOps

from runtime import infotext
from sdeks.errors import InvalidParameterError


def decode_image(data: str, field_name: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a `data:` URL) as RGB, refusing bombs and garbage."""
    if not isinstance(data, str) or not data:
        raise InvalidParameterError(f"`{field_name}` must be a base64 image, got nothing")
    if "://" in data[:16] and not data.startswith("data:"):
        raise InvalidParameterError(
            f"`{field_name}` is a link ({data[:80]!r}): links are fetched for tasks sent "
            "through SNS; on /sdapi/v1 send the image itself, base64-encoded"
        )
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=False)
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > max_pixels:
            raise InvalidParameterError(
                f"`{field_name}` is {image.width}x{image.height}, over the limit of "
                f"{max_pixels} pixels"
            )
        image.load()
    except InvalidParameterError:
        raise
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidParameterError(
            f"`{field_name}` is not a decodable image ({type(exc).__name__}: {exc})"[:300]
        ) from exc
    return ImageOps.exif_transpose(image)


def encode_png(image: Image.Image, parameters: str | None = None) -> bytes:
    """PNG bytes with the A1111 `parameters` tEXt chunk."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    if parameters:
        meta.add_text(infotext.PNG_TEXT_KEY, parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def resize_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111 `images.resize_image`: 0 stretch, 1 crop to fill, 2 fit and fill, 3 = 0."""
    lanczos = Image.Resampling.LANCZOS
    if mode == 1:
        return ImageOps.fit(image, (width, height), lanczos)
    if mode == 2:
        # A1111 fills the borders by stretching the edge; a stretched copy behind is close.
        canvas = image.resize((width, height), lanczos).filter(ImageFilter.GaussianBlur(8))
        fitted = ImageOps.contain(image, (width, height), lanczos)
        canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
        return canvas
    return image.resize((width, height), lanczos)


def fill_masked(image: Image.Image, mask: Image.Image, mode: int) -> Image.Image:
    """A1111 `inpainting_fill` before denoising: 0 fill, 1 original, 2 noise, 3 nothing."""
    if mode == 1:
        return image
    if mode == 0:
        # A1111 fills with the image's colours smeared across the hole.
        filler = image.filter(ImageFilter.GaussianBlur(max(image.size) // 8 or 1))
    elif mode == 2:
        filler = Image.effect_noise(image.size, 64).convert("RGB")
    elif mode == 3:
        filler = Image.new("RGB", image.size, (127, 127, 127))
    else:
        raise InvalidParameterError(f"`inpainting_fill` must be 0, 1, 2 or 3, got {mode}")
    return Image.composite(filler, image, mask.point(lambda v: 255 if v > 127 else 0))
