"""A1111's img2img `initial_noise_multiplier` (body field or option), on the tiny checkpoint."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime.a1111 import Img2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.settings import RuntimeSettings
from sdeks.errors import InvalidParameterError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    cache = tmp_path_factory.mktemp("noise-cache")
    settings = RuntimeSettings(default_model="tiny-sd15", cache_dir=cache)
    return Renderer(ModelStore(LocalSource(tiny_models_dir), cache_dir=cache), settings)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body(mask: bool, **fields) -> Img2ImgRequest:
    image = Image.new("RGB", (64, 64), (90, 110, 100))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(200, 40, 40))
    extra = {}
    if mask:
        m = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(m).rectangle((8, 8, 55, 55), fill="white")
        extra = {"mask": _b64(m), "inpaint_full_res": False}
    return Img2ImgRequest(
        prompt="a cube",
        steps=2,
        width=64,
        height=64,
        seed=5,
        denoising_strength=0.6,
        init_images=[_b64(image)],
        **extra,
        **fields,
    )


def first_unet_input(renderer: Renderer, request: Img2ImgRequest, options=OPTIONS):
    with renderer.models.use("tiny-sd15") as lease:
        unet = lease.pipeline.unet
    seen: list = []
    handle = unet.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    try:
        result = renderer.img2img(request, options=options)
    finally:
        handle.remove()
    return seen[0], result


@pytest.mark.parametrize("mask", [False, True], ids=["img2img", "inpaint"])
def test_the_initial_noise_is_scaled_linearly(renderer, mask):
    """First UNet input = noised init latents: init part + sigma * m * noise, linear in m."""
    first = {}
    for m in (0.5, 1.0, 1.5):
        first[m], result = first_unet_input(renderer, body(mask, initial_noise_multiplier=m))
        assert (result.info["extra_generation_params"].get("Noise multiplier")) == (
            None if m == 1.0 else m
        )
    up, down = first[1.5] - first[1.0], first[1.0] - first[0.5]
    assert float(up.abs().max()) > 1e-3
    assert float((up - down).abs().max()) < 1e-4


def test_the_option_applies_when_the_body_leaves_it_unset(renderer):
    by_body, _ = first_unet_input(renderer, body(False, initial_noise_multiplier=1.5))
    by_option, result = first_unet_input(
        renderer, body(False), options={**OPTIONS, "initial_noise_multiplier": 1.5}
    )
    assert np.allclose(by_body.numpy(), by_option.numpy())
    assert "Noise multiplier: 1.5" in result.infotexts[0]


@pytest.mark.parametrize("bad", [2.0, -0.1, float("nan")])
def test_out_of_range_is_refused_naming_the_field(renderer, bad):
    with pytest.raises(InvalidParameterError, match="`initial_noise_multiplier` must be between"):
        renderer.img2img(body(False, initial_noise_multiplier=bad), options=OPTIONS)
