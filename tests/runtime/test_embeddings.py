"""Textual-inversion embeddings (runtime/embeddings.py) on the tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime import embeddings, infotext
from runtime.a1111 import Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.tiny_embeddings import make_tiny_embedding

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def models_root(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models-ti")
    shutil.copytree(tiny_models_dir / "Stable-diffusion", root / "Stable-diffusion")
    make_tiny_embedding(root / "embeddings" / "shiny-style", family="sd15", seed=1)
    make_tiny_embedding(root / "embeddings" / "old-style", family="sd15", seed=2, pt=True)
    make_tiny_embedding(root / "embeddings" / "xl-style", family="sdxl", seed=3)
    return root


@pytest.fixture(scope="module")
def renderer(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


def t2i(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 4}
    return Txt2ImgRequest(**{**base, **fields})


def px(result) -> np.ndarray:
    return np.asarray(result.images[0])


def test_formats_load_as_a1111_reads_them(models_root: Path):
    sd1 = embeddings.load_embedding(models_root / "embeddings" / "shiny-style.safetensors")
    a1111_pt = embeddings.load_embedding(models_root / "embeddings" / "old-style.pt")
    xl = embeddings.load_embedding(models_root / "embeddings" / "xl-style.safetensors")
    assert tuple(sd1["vectors"].shape) == (2, 32) and tuple(a1111_pt["vectors"].shape) == (2, 32)
    assert tuple(xl["clip_l"].shape) == (2, 32) and tuple(xl["clip_g"].shape) == (2, 64)


def test_an_embedding_name_in_the_prompt_changes_the_conditioning(renderer):
    plain = renderer.txt2img(t2i(prompt="a red cube, shiny"), options=OPTIONS)
    with_ti = renderer.txt2img(t2i(prompt="a red cube, shiny-style"), options=OPTIONS)
    other = renderer.txt2img(t2i(prompt="a red cube, old-style"), options=OPTIONS)
    negative = renderer.txt2img(t2i(negative_prompt="shiny-style"), options=OPTIONS)
    after = renderer.txt2img(t2i(prompt="a red cube, shiny"), options=OPTIONS)

    assert not np.array_equal(px(plain), px(with_ti))
    assert not np.array_equal(px(with_ti), px(other))
    assert not np.array_equal(px(negative), px(renderer.txt2img(t2i(), options=OPTIONS)))
    assert np.array_equal(px(plain), px(after))  # the tokens were removed again
    assert infotext.parse(with_ti.infotexts[0])["TI hashes"].startswith("shiny-style")
    with renderer.models.use("tiny-sd15") as lease:
        assert "shiny-style" not in lease.pipeline.tokenizer.get_vocab()


def test_sdxl_embedding_on_sdxl_and_skipped_where_it_does_not_fit(renderer):
    plain = renderer.txt2img(t2i(prompt="a cube xl"), options=OPTIONS, model="tiny-sdxl")
    xl = renderer.txt2img(t2i(prompt="a cube xl-style"), options=OPTIONS, model="tiny-sdxl")
    assert not np.array_equal(px(plain), px(xl))
    # an SD 1.x embedding on SDXL, an SDXL one on SD 1.x: skipped as A1111 skips them
    sd1_on_xl = renderer.txt2img(
        t2i(prompt="a cube shiny-style"), options=OPTIONS, model="tiny-sdxl"
    )
    assert "TI hashes" not in sd1_on_xl.infotexts[0]
    xl_on_sd1 = renderer.txt2img(t2i(prompt="a cube xl-style"), options=OPTIONS)
    assert "TI hashes" not in xl_on_sd1.infotexts[0]


def test_embeddings_route(models_root: Path, tmp_path: Path):
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    settings = RuntimeSettings(default_model="tiny-sd15", models=str(models_root))
    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path)
    with TestClient(create_app(settings, models=store)) as client:
        body = client.get("/sdapi/v1/embeddings").json()
    assert set(body["loaded"]) == {"shiny-style", "old-style", "xl-style"}
    assert body["loaded"]["shiny-style"]["vectors"] == 2
    assert body["loaded"]["shiny-style"]["shape"] == 32
