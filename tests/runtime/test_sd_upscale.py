"""The "SD upscale" script (runtime/sd_upscale.py): upscale, img2img per tile, blend."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import infotext
from runtime.a1111 import Img2ImgRequest, Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.sd_upscale import combine_grid, split_grid
from sdeks.errors import InvalidParameterError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sd_upscale(*args, **fields) -> Img2ImgRequest:
    base = {
        "prompt": "a red cube",
        "steps": 2,
        "width": 32,
        "height": 32,
        "seed": 5,
        "denoising_strength": 0.6,
        "init_images": [_b64(_gradient(48, 48))],
    }
    return Img2ImgRequest(**{**base, **fields, "script_name": "SD upscale", "script_args": args})


def test_split_then_combine_unchanged_tiles_gives_the_image_back():
    image = _gradient(100, 70)
    grid = split_grid(image, 32, 32, 8)
    assert len(grid.tiles) == 4 * 3  # ceil(92/24) columns, ceil(62/24) rows
    assert all(t.image.size == (32, 32) for t in grid.tiles)
    assert np.array_equal(np.asarray(combine_grid(grid)), np.asarray(image))


def test_sd_upscale_renders_every_tile_and_blends_them_at_the_scaled_size(renderer, monkeypatch):
    # GIVEN a 48 px image, 32 px tiles overlapping 8 px, Lanczos (index 1), scale 2
    calls: list[tuple[int, int | None]] = []
    generate = renderer.generate

    def counting(request, img, **kw):
        if request.script_name is None:
            calls.append((len(request.init_images or []), request.seed))
        return generate(request, img, **kw)

    monkeypatch.setattr(renderer, "generate", counting)
    result = renderer.img2img(sd_upscale("", 8, 1, 2.0), options=OPTIONS)

    # THEN one 96x96 image, made of ceil(88/24)^2 = 16 img2img tile renders
    assert len(result.images) == 1 and result.images[0].size == (96, 96)
    assert len(calls) == 16 and all(n == 1 for n, _ in calls)
    # the tiles were re-rendered: not the plain Lanczos upscale
    lanczos = _gradient(48, 48).resize((96, 96), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(result.images[0], np.int16) - np.asarray(lanczos, np.int16))
    assert diff.mean() > 1.0
    fields = infotext.parse(result.infotexts[0])
    assert fields["Size"] == "32x32" and fields["Seed"] == "5"
    assert result.info["extra_generation_params"]["Script"] == "SD upscale"


def test_sd_upscale_n_iter_gives_one_image_per_iteration_with_its_seed(renderer):
    result = renderer.img2img(sd_upscale("", 16, "Lanczos", 1.0, n_iter=2), options=OPTIONS)
    assert [im.size for im in result.images] == [(48, 48), (48, 48)]
    assert result.seeds == [5, 6]
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_sd_upscale_bad_arguments_are_refused_naming_them(renderer):
    with pytest.raises(InvalidParameterError, match=r"script_args\[2\] \(upscaler_index\)"):
        renderer.img2img(sd_upscale("", 8, 999, 2.0), options=OPTIONS)
    with pytest.raises(InvalidParameterError, match="no-such-upscaler"):
        renderer.img2img(sd_upscale("", 8, "no-such-upscaler", 2.0), options=OPTIONS)
    with pytest.raises(InvalidParameterError, match=r"script_args\[3\] \(scale_factor\)"):
        renderer.img2img(sd_upscale("", 8, 1, float("nan")), options=OPTIONS)
    with pytest.raises(InvalidParameterError, match=r"script_args\[1\] \(overlap\)"):
        renderer.img2img(sd_upscale("", 40, 1, 2.0), options=OPTIONS)
    with pytest.raises(InvalidParameterError, match="over the limit"):
        renderer.img2img(sd_upscale("", 0, 1, 8.0, width=8, height=8), options=OPTIONS)
    # SD upscale is an img2img script: txt2img refuses it by name
    with pytest.raises(InvalidParameterError, match="'SD upscale' is not supported for txt2img"):
        renderer.txt2img(
            Txt2ImgRequest(prompt="p", steps=2, width=64, height=64, script_name="SD upscale"),
            options=OPTIONS,
        )


@pytest.mark.parametrize(("w", "h"), [(48, 40), (40, 100), (100, 20)])
def test_an_image_smaller_than_the_tile_splits_at_zero_and_combines_back(w, h):
    image = _gradient(w, h)
    grid = split_grid(image, 64, 64, 24)
    assert all(t.x >= 0 and t.y >= 0 for t in grid.tiles)
    assert np.array_equal(np.asarray(combine_grid(grid)), np.asarray(image))


def test_sd_upscale_to_less_than_one_tile_keeps_the_upscaled_size(renderer):
    # GIVEN a 24 px image upscaled x2 (48 px), smaller than the 64 px tile
    request = sd_upscale("", 32, 1, 2.0, width=64, height=64, init_images=[_b64(_gradient(24, 24))])
    result = renderer.img2img(request, options=OPTIONS)
    assert len(result.images) == 1 and result.images[0].size == (48, 48)
