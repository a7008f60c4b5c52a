"""Prompt styles (runtime/styles.py) and tiling (runtime/tiling.py) on the tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from runtime import infotext, styles
from runtime.a1111 import Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from sdeks.errors import InvalidParameterError

OPTIONS = dict(DEFAULT_OPTIONS)
STYLES_CSV = (
    "name,prompt,negative_prompt\n"
    '"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
    "Sharp,sharp focus,blurry\n"
)


@pytest.fixture(scope="module")
def models_root(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models-styles")
    shutil.copytree(tiny_models_dir / "Stable-diffusion", root / "Stable-diffusion")
    (root / "styles.csv").write_text(STYLES_CSV)
    return root


@pytest.fixture(scope="module")
def renderer(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


def t2i(**fields) -> Txt2ImgRequest:
    return Txt2ImgRequest(
        **{"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 3, **fields}
    )


def test_merge_follows_a1111():
    assert (
        styles.merge("cinematic still of {prompt}, grain", "a cat")
        == "cinematic still of a cat, grain"
    )
    assert styles.merge("sharp focus", "a cat") == "a cat, sharp focus"
    assert styles.merge("sharp focus", "") == "sharp focus"
    assert list(styles.parse(STYLES_CSV)) == ["Cinematic", "Sharp"]


def test_styles_change_the_prompt_the_pixels_and_the_infotext(renderer):
    styled = renderer.txt2img(t2i(styles=["Cinematic", "Sharp"]), options=OPTIONS)
    by_hand = renderer.txt2img(
        t2i(
            prompt="cinematic still of a red cube, film grain, sharp focus",
            negative_prompt="cartoon, drawing, blurry",
        ),
        options=OPTIONS,
    )
    plain = renderer.txt2img(t2i(styles=[]), options=OPTIONS)
    parsed = infotext.parse(styled.infotexts[0])
    assert parsed["Prompt"] == "cinematic still of a red cube, film grain, sharp focus"
    assert parsed["Negative prompt"] == "cartoon, drawing, blurry"
    assert styled.info["styles"] == ["Cinematic", "Sharp"]
    assert np.array_equal(np.asarray(styled.images[0]), np.asarray(by_hand.images[0]))
    assert not np.array_equal(np.asarray(styled.images[0]), np.asarray(plain.images[0]))
    with pytest.raises(InvalidParameterError, match=r"`styles` \['Nope'\] not found.*Cinematic"):
        renderer.txt2img(t2i(styles=["Nope"]), options=OPTIONS)


def test_prompt_styles_and_scripts_routes(models_root: Path, tmp_path: Path):
    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    settings = RuntimeSettings(default_model="tiny-sd15", models=str(models_root))
    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path)
    with TestClient(create_app(settings, models=store)) as client:
        listed = client.get("/sdapi/v1/prompt-styles").json()
        scripts = client.get("/sdapi/v1/scripts").json()
    assert listed[0] == {
        "name": "Cinematic",
        "prompt": "cinematic still of {prompt}, film grain",
        "negative_prompt": "cartoon, drawing",
    }
    assert "x/y/z plot" in scripts["txt2img"] and "x/y/z plot" in scripts["img2img"]
    assert "sd upscale" in scripts["img2img"] and "sd upscale" not in scripts["txt2img"]


def test_tiling_pads_circularly_for_the_job_only(renderer):
    from runtime.tiling import circular, conv_layers

    plain = renderer.txt2img(t2i(), options=OPTIONS)
    tiled = renderer.txt2img(t2i(tiling=True), options=OPTIONS)
    again = renderer.txt2img(t2i(tiling=False), options=OPTIONS)

    assert infotext.parse(tiled.infotexts[0])["Tiling"] == "True"
    assert "Tiling" not in plain.infotexts[0]
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(tiled.images[0]))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))  # restored
    with renderer.models.use("tiny-sd15") as lease:
        layers = conv_layers(lease.pipeline)
        assert layers and {layer.padding_mode for layer in layers} == {"zeros"}
        with circular(lease.pipeline):
            assert {layer.padding_mode for layer in layers} == {"circular"}
        assert {layer.padding_mode for layer in layers} == {"zeros"}


def test_tiled_unet_wraps_around(renderer):
    """With circular padding a conv net is shift-equivariant: rolling its input rolls
    its output (without it, the borders break that)."""
    import torch

    from runtime.tiling import circular

    with renderer.models.use("tiny-sd15") as lease:
        vae = lease.pipeline.vae
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode(), circular(lease.pipeline):
            out = vae.decode(latents).sample
            rolled = vae.decode(torch.roll(latents, 2, dims=3)).sample
        with torch.inference_mode():
            zero_out = vae.decode(latents).sample
            zero_rolled = vae.decode(torch.roll(latents, 2, dims=3)).sample
    shift = 2 * out.shape[-1] // 8
    assert torch.allclose(torch.roll(out, shift, dims=3), rolled, atol=1e-4)
    assert not torch.allclose(torch.roll(zero_out, shift, dims=3), zero_rolled, atol=1e-4)
