"""The "SD upscale" script (A1111's `scripts/sd_upscale.py`): upscale, then img2img per tile.

`script_args` is A1111's positional layout (the script's `ui()` order):

    0 info (ignored)  1 overlap (px, default 64)  2 upscaler_index  3 scale_factor (default 2)

`upscaler_index` indexes A1111's upscaler list, which is `/sdapi/v1/upscalers`
here (None, Lanczos, Nearest, then the bucket's models); an upscaler name is
accepted too. The init image is upscaled by `scale_factor`, split into tiles of
the request's `width` x `height` that overlap by `overlap` pixels, each tile is
re-rendered with img2img (`denoising_strength` and the prompt as given), and
the tiles are blended back across the overlaps.

As in A1111: `n_iter` is the number of upscaled images (each from seed + n), and
the tiles of one image are rendered `batch_size` at a time, the k-th tile of a
batch with seed + n + k; only the first init image is used.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from runtime.images import decode_image, encode_png
from runtime.stages.types import RenderResult
from runtime.upscalers import available, check_upscaler, upscale_image
from sdeks.errors import InvalidParameterError

if TYPE_CHECKING:
    from runtime.a1111 import GenerationRequest, Img2ImgRequest
    from runtime.control import JobControl
    from runtime.render import Renderer

#: Tiles one upscaled image may be cut into (each is one img2img render).
MAX_TILES = 256


@dataclass
class Tile:
    x: int
    y: int
    image: Image.Image


@dataclass
class Grid:
    """A1111's `images.Grid`: rows of tiles over an image of `width` x `height`."""

    rows: list[tuple[int, list[Tile]]]
    tile_w: int
    tile_h: int
    width: int
    height: int
    overlap: int

    @property
    def tiles(self) -> list[Tile]:
        return [tile for _, row in self.rows for tile in row]


def tile_count(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> int:
    cols = max(1, math.ceil((width - overlap) / (tile_w - overlap)))
    rows = max(1, math.ceil((height - overlap) / (tile_h - overlap)))
    return cols * rows


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Grid:
    """Tiles of `tile_w` x `tile_h` covering `image`, neighbours sharing `overlap` px."""
    w, h = image.size
    cols = max(1, math.ceil((w - overlap) / (tile_w - overlap)))
    rows = max(1, math.ceil((h - overlap) / (tile_h - overlap)))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    # An image smaller than a tile is one tile at 0, padded past the image's edge (and
    # cut back to the image by `combine_grid`): a negative offset would blend it with
    # the black of a left/upper neighbour that does not exist.
    for row in range(rows):
        y = max(0, min(int(row * dy), h - tile_h))
        tiles = []
        for col in range(cols):
            x = max(0, min(int(col * dx), w - tile_w))
            tiles.append(Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.rows.append((y, tiles))
    return grid


def combine_grid(grid: Grid) -> Image.Image:
    """The tiles pasted back, each blended into its left and upper neighbour by a ramp."""
    ov = grid.overlap
    ramp = np.arange(ov, dtype=np.float32) * 255 / max(ov, 1)
    mask_w = Image.fromarray(np.repeat(ramp[None, :], grid.tile_h, axis=0).astype(np.uint8), "L")
    mask_h = Image.fromarray(np.repeat(ramp[:, None], grid.width, axis=1).astype(np.uint8), "L")
    combined = Image.new("RGB", (grid.width, grid.height))
    for y, row in grid.rows:
        line = Image.new("RGB", (grid.width, grid.tile_h))
        for tile in row:
            if tile.x == 0 or ov == 0:
                line.paste(tile.image, (tile.x, 0))
                continue
            line.paste(tile.image.crop((0, 0, ov, grid.tile_h)), (tile.x, 0), mask=mask_w)
            line.paste(tile.image.crop((ov, 0, grid.tile_w, grid.tile_h)), (tile.x + ov, 0))
        if y == 0 or ov == 0:
            combined.paste(line, (0, y))
            continue
        combined.paste(line.crop((0, 0, grid.width, ov)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, ov, grid.width, grid.tile_h)), (0, y + ov))
    return combined


def _b64png(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode()


class SDUpscale:
    title = "SD upscale"
    kinds: tuple[str, ...] = ("img2img",)

    def run(
        self,
        renderer: Renderer,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        *,
        options: Mapping[str, Any],
        model: str | None,
        control: JobControl,
    ) -> RenderResult:
        if img is None or not img.init_images:
            raise InvalidParameterError("`script_name` SD upscale needs `init_images`")
        args = list(request.script_args or [])
        args += [None] * max(0, 4 - len(args))
        overlap = _int(args[1], 64, "script_args[1] (overlap)", 0, min(img.width, img.height) - 1)
        upscaler = self._upscaler(renderer, args[2])
        scale = _float(args[3], 2.0, "script_args[3] (scale_factor)", 1.0, 8.0)

        settings = renderer.settings
        init = decode_image(img.init_images[0], "init_images[0]", settings.max_pixels)
        width, height = round(init.width * scale), round(init.height * scale)
        if width * height > settings.max_pixels:
            raise InvalidParameterError(
                f"SD upscale of a {init.width}x{init.height} image by {scale} is {width}x"
                f"{height}, over the limit of {settings.max_pixels} pixels"
            )
        tiles = tile_count(width, height, img.width, img.height, overlap)
        if tiles * request.n_iter > MAX_TILES:
            raise InvalidParameterError(
                f"SD upscale to {width}x{height} in {img.width}x{img.height} tiles is {tiles} "
                f"tiles x {request.n_iter} images, over the limit of {MAX_TILES} renders"
            )
        if upscaler == "None":
            big = init
        else:
            big = upscale_image(
                renderer.models,
                init,
                upscaler,
                width,
                height,
                options=options,
                check=control.check,
                field_name="script_args[2] (upscaler_index)",
            )
        seed = request.seed
        if seed is None or seed == -1:
            import random

            seed = random.randrange(4294967294)
        base = img.model_copy(
            update={"script_name": None, "script_args": [], "batch_size": 1, "n_iter": 1}
        )
        images, infotexts, seeds = [], [], []
        first: RenderResult | None = None
        for n in range(request.n_iter):
            start = seed + n
            grid = split_grid(big, img.width, img.height, overlap)
            for k, tile in enumerate(grid.tiles):
                control.check()
                tile_request = base.model_copy(
                    update={
                        "init_images": [_b64png(tile.image)],
                        "seed": start + k % max(1, request.batch_size),
                        "mask": None,
                    }
                )
                result = renderer.generate(
                    tile_request, tile_request, options=options, model=model, control=control
                )
                if k == 0:
                    infotexts.append(result.infotexts[0])
                first = first or result
                tile.image = result.images[0]
            images.append(combine_grid(grid))
            seeds.append(start)
        assert first is not None
        info = dict(first.info)
        info.update(
            {
                "seed": seeds[0],
                "all_seeds": seeds,
                "infotexts": infotexts,
                "extra_generation_params": {
                    **dict(info.get("extra_generation_params") or {}),
                    "Script": self.title,
                    "SD upscale overlap": overlap,
                    "SD upscale upscaler": upscaler,
                },
            }
        )
        return RenderResult(
            images=images,
            infotexts=infotexts,
            info=info,
            parameters=request.model_dump(exclude={"init_images", "mask"}),
            seeds=seeds,
            model=first.model,
            model_load_ms=first.model_load_ms,
            inference_ms=first.inference_ms,
        )

    def _upscaler(self, renderer: Renderer, value: Any) -> str:
        field_name = "script_args[2] (upscaler_index)"
        names = available(renderer.models)
        if value is None:
            return "None"
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            check_upscaler(renderer.models, value, field_name)
            return value
        index = _int(value, 0, field_name, 0, len(names) - 1)
        return names[index]


def _int(value: Any, default: int, field_name: str, low: int, high: int) -> int:
    if value is None or value == "":
        return max(low, min(default, high))
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidParameterError(f"`{field_name}` must be an integer, got {value!r:.40}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameterError(
            f"`{field_name}` must be an integer, got {value!r:.40}"
        ) from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise InvalidParameterError(
            f"`{field_name}` must be an integer from {low} to {high}, got {value!r:.40}"
        )
    return int(number)


def _float(value: Any, default: float, field_name: str, low: float, high: float) -> float:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidParameterError(f"`{field_name}` must be a number, got {value!r:.40}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameterError(f"`{field_name}` must be a number, got {value!r:.40}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidParameterError(
            f"`{field_name}` must be a number from {low} to {high}, got {value!r:.40}"
        )
    return number


SD_UPSCALE = SDUpscale()
