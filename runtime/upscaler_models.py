"""Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT, ...): names, loading, tiled runs.

Files come from the models bucket in AUTOMATIC1111's folders and are loaded
with spandrel, which detects the architecture from the state dict (the
library A1111 and ComfyUI load upscalers with). They are a `ModelKind` of
the model store (`UPSCALER`): loaded once into RAM, copied to the GPU, LRU
and memory-accounted with the checkpoints.

Names follow A1111 (`modules/realesrgan_model.py`, `esrgan_model.py`,
`swinir_model.py`, `dat_model.py`): its built-in upscalers keep their
display names ("R-ESRGAN 4x+" is `RealESRGAN/RealESRGAN_x4plus.pth`), every
other file is named by its stem ("4x-UltraSharp" is
`ESRGAN/4x-UltraSharp.pth`). A name also matches the file name with or
without suffix. `/sdapi/v1/upscalers` lists what the bucket holds.

Upscaling runs the model in tiles (`tile` pixels, `overlap` pixels shared by
neighbours, A1111's `ESRGAN_tile` / `ESRGAN_tile_overlap` options): the
largest tensor the model sees is one tile, whatever the image size. Each
output pixel comes from the tile whose core (the tile less half the overlap
on each inner side) holds it, so for a model that looks no further than half
the overlap the tiled result equals the untiled one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from runtime.model_catalog import ModelEntry
from runtime.model_store import ModelKind
from sdeks.bounds import MAX_PIXELS
from sdeks.errors import InvalidParameterError, ModelLoadError, SdeksError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Bucket folders of model upscalers (A1111's `models/<folder>`), in lookup order.
UPSCALER_FOLDERS = (
    "ESRGAN/",
    "RealESRGAN/",
    "SwinIR/",
    "DAT/",
    "HAT/",
    "ScuNET/",
    "upscale_models/",  # ComfyUI's folder, so a shared bucket works for both
)
#: `.pth` files load with spandrel's restricted unpickler (tensors only, no code).
UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt")

#: A1111's display names of its built-in model upscalers -> the file stems they stand for.
A1111_NAMES: dict[str, tuple[str, ...]] = {
    "R-ESRGAN General 4xV3": ("realesr-general-x4v3",),
    "R-ESRGAN General WDN 4xV3": ("realesr-general-wdn-x4v3",),
    "R-ESRGAN AnimeVideo": ("realesr-animevideov3",),
    "R-ESRGAN 4x+": ("RealESRGAN_x4plus",),
    "R-ESRGAN 4x+ Anime6B": ("RealESRGAN_x4plus_anime_6B",),
    "R-ESRGAN 2x+": ("RealESRGAN_x2plus",),
    "ESRGAN_4x": ("ESRGAN_4x", "ESRGAN_SRx4_DF2KOST_official-ff704c30"),
    "SwinIR 4x": ("SwinIR_4x", "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN"),
    "DAT x2": ("DAT_x2",),
    "DAT x3": ("DAT_x3",),
    "DAT x4": ("DAT_x4",),
    "ScuNET GAN": ("scunet_color_real_gan",),
    "ScuNET PSNR": ("scunet_color_real_psnr",),
}
_STEM_TO_A1111 = {stem: name for name, stems in A1111_NAMES.items() for stem in stems}

#: A1111 upscalers that are not spandrel models: refused by name with the reason.
UNSUPPORTED: dict[str, str] = {
    "LDSR": "LDSR is a latent diffusion upscaler (its own diffusion model), not supported here",
}

#: A1111's defaults for `ESRGAN_tile` and `ESRGAN_tile_overlap`.
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 8
MAX_TILE = 1024
#: A1111 runs a model at most 3 times to reach the asked scale, then resizes the rest.
MAX_PASSES = 3


def load_upscaler(path: Path, entry: ModelEntry) -> Any:
    """A spandrel image model on the CPU in eval mode (an `ImageModelDescriptor`)."""
    import spandrel

    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
    except spandrel.UnsupportedModelError as exc:
        raise ModelLoadError(
            f"upscaler {entry.name}: spandrel does not recognise its architecture"
        ) from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in (
        "SR",
        "Restoration",
    ):
        raise ModelLoadError(
            f"upscaler {entry.name} is a {descriptor.architecture.name} model "
            f"({descriptor.purpose}), not an image upscaler"
        )
    descriptor.model.requires_grad_(False)
    return descriptor.eval()


def upscaler_to_device(descriptor: Any, device: str, dtype: Any) -> Any:
    """A device copy; half precision on CUDA only where the architecture supports it."""
    import copy

    import torch

    clone = copy.deepcopy(descriptor).to(device)
    if device.startswith("cuda") and dtype == torch.float16 and clone.supports_half:
        clone = clone.half()
    return clone


@dataclass(frozen=True)
class UpscalerInfo:
    """One model upscaler as `/sdapi/v1/upscalers` lists it."""

    name: str
    entry: ModelEntry
    #: The model's scale when the file name says it (`4x-UltraSharp`, `RealESRGAN_x2plus`).
    scale: float | None

    def item(self, source_url: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_name": self.entry.model_name,
            "model_path": f"{source_url.rstrip('/')}/{self.entry.key}",
            "model_url": None,
            "scale": self.scale,
        }


def display_name(entry: ModelEntry) -> str:
    """A1111's name for a file: its built-in display name, else the file's stem."""
    stem = entry.model_name.rsplit("/", 1)[-1]
    return _STEM_TO_A1111.get(stem, entry.model_name)


UPSCALER = ModelKind(
    "upscaler",
    folders=UPSCALER_FOLDERS,
    load=load_upscaler,
    suffixes=UPSCALER_SUFFIXES,
    to_device=upscaler_to_device,
    display_name=display_name,
)


def _scale_from_name(stem: str) -> float | None:
    import re

    match = re.search(r"(?:^|[^a-z0-9])(\d)x(?:[^a-z0-9]|$)|x(\d)(?:[^0-9]|$)", stem.lower())
    if match is None:
        return None
    return float(match.group(1) or match.group(2))


def available(entries: list[ModelEntry]) -> list[UpscalerInfo]:
    """The model upscalers in a listing, named as A1111 names them; the first of two
    files with the same name wins (folders are searched in `UPSCALER_FOLDERS` order)."""
    seen: dict[str, UpscalerInfo] = {}
    for entry in entries:
        name = display_name(entry)
        if name not in seen:
            stem = entry.model_name.rsplit("/", 1)[-1]
            seen[name] = UpscalerInfo(name=name, entry=entry, scale=_scale_from_name(stem))
    return list(seen.values())


def find(entries: list[ModelEntry], requested: str) -> ModelEntry | None:
    """The file an upscaler name means: A1111 display name, file name or stem."""
    wanted = requested.strip()
    infos = available(entries)
    for info in infos:
        if wanted == info.name:
            return info.entry
    for info in infos:
        if wanted in info.entry.aliases():
            return info.entry
    return None


def unknown_upscaler(field: str, requested: str, names: list[str]) -> SdeksError:
    """The error for a name that is no upscaler here (`invalid_parameter`, as for any
    other unusable field value): it names the field and lists what exists; LDSR
    says why it is refused."""
    reason = UNSUPPORTED.get(requested.strip())
    listed = ", ".join(names) or "none"
    if reason:
        return InvalidParameterError(f"`{field}` {requested!r}: {reason}; available: {listed}")
    return InvalidParameterError(
        f"`{field}` {requested!r} is not installed; available upscalers: {listed}"
    )


def tile_options(options: Any) -> tuple[int, int]:
    """(tile, overlap) from A1111's `ESRGAN_tile` / `ESRGAN_tile_overlap` options."""
    values = []
    for key, default, top in (
        ("ESRGAN_tile", DEFAULT_TILE, MAX_TILE),
        ("ESRGAN_tile_overlap", DEFAULT_OVERLAP, 64),
    ):
        value = options.get(key, default) if options else default
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            raise InvalidParameterError(f"`{key}` must be an integer 0..{top}, got {value!r}")
        values.append(value)
    tile, overlap = values
    if tile and overlap * 2 >= tile:
        raise InvalidParameterError(
            f"`ESRGAN_tile_overlap` {overlap} must be less than half of `ESRGAN_tile` {tile}"
        )
    return tile, overlap


# --- running a model ------------------------------------------------------------


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (start, end, core start, core end) in input pixels.

    Tiles are `tile` long (the last one moved back inside the image) and step by
    `tile - overlap`; cores split each overlap in the middle, so every pixel
    belongs to exactly one core.
    """
    if tile <= 0 or size <= tile:
        return [(0, size, 0, size)]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    spans: list[tuple[int, int, int, int]] = []
    for i, start in enumerate(starts):
        core_start = 0 if i == 0 else (start + spans[-1][1]) // 2
        spans.append((start, start + tile, core_start, 0))
    cores = []
    for i, (start, end, core_start, _) in enumerate(spans):
        core_end = size if i == len(spans) - 1 else spans[i + 1][2]
        cores.append((start, end, core_start, core_end))
    return cores


def run_tiled(
    descriptor: Any,
    pixels: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    check: Any = None,
) -> torch.Tensor:
    """The model over `pixels` (1, C, H, W in [0, 1], on the model's device and dtype)
    in tiles; the result is assembled on the CPU in float32."""
    import torch

    _, channels, height, width = pixels.shape
    scale = descriptor.scale
    out = torch.empty((1, channels, height * scale, width * scale), dtype=torch.float32)
    for y0, y1, cy0, cy1 in _spans(height, tile, overlap):
        for x0, x1, cx0, cx1 in _spans(width, tile, overlap):
            if check is not None:
                check()
            with torch.inference_mode():
                result = descriptor(pixels[:, :, y0:y1, x0:x1])
            core = result[
                :,
                :,
                (cy0 - y0) * scale : (cy1 - y0) * scale,
                (cx0 - x0) * scale : (cx1 - x0) * scale,
            ]
            out[:, :, cy0 * scale : cy1 * scale, cx0 * scale : cx1 * scale] = core.float().cpu()
    return out


def to_tensor(image: Image.Image, device: Any, dtype: Any) -> torch.Tensor:
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def to_image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype("uint8")
    return Image.fromarray(array, "RGB")


def pass_sizes(
    width: int, height: int, scale: int, target_w: int, target_h: int
) -> list[tuple[int, int]]:
    """The output size of each model pass `upscale_with` makes from `width` x `height`
    towards `target_w` x `target_h`, counted without running anything."""
    sizes: list[tuple[int, int]] = []
    for _ in range(MAX_PASSES):
        if width >= target_w and height >= target_h:
            break
        width, height = width * scale, height * scale
        sizes.append((width, height))
    return sizes


def check_passes(
    image: Image.Image,
    scale: int,
    width: int,
    height: int,
    *,
    field_name: str,
    name: str,
    max_pixels: int = MAX_PIXELS,
) -> None:
    """Refuse an upscale whose model passes would make an image over `max_pixels`:
    the model runs at its own scale, so a 4x model asked for 1.1x still makes a 4x
    image (16 times the pixels) before the resize, and that is what gets allocated."""
    for w, h in pass_sizes(image.width, image.height, scale, width, height):
        if w * h > max_pixels:
            raise InvalidParameterError(
                f"`{field_name}` {name!r} is a {scale}x model: upscaling {image.width}x"
                f"{image.height} towards {width}x{height} makes a {w}x{h} image, over the "
                f"limit of {max_pixels} pixels"
            )


def upscale_with(
    descriptor: Any,
    image: Image.Image,
    width: int,
    height: int,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    check: Any = None,
    field_name: str = "upscaler",
    name: str = "upscaler",
) -> Image.Image:
    """`image` upscaled by the model to exactly `width` x `height`, as A1111 does it:
    run the model (up to 3 times) until the image is at least that large, then a
    Lanczos resize to the exact size. Every pass's size is checked first (`check_passes`)."""
    check_passes(image, int(descriptor.scale), width, height, field_name=field_name, name=name)
    current = image.convert("RGB")
    for _ in range(MAX_PASSES):
        if current.width >= width and current.height >= height:
            break
        pixels = to_tensor(current, descriptor.device, descriptor.dtype)
        current = to_image(run_tiled(descriptor, pixels, tile=tile, overlap=overlap, check=check))
    if current.size != (width, height):
        current = current.resize((width, height), Image.Resampling.LANCZOS)
    return current
