"""ControlNet units through the renderer, on tiny random ControlNets (CPU, 64x64, 3 steps).

Each test would fail if the units were ignored: they compare the same seed with
and without units, and count how often the ControlNet runs.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime import infotext
from runtime.a1111 import Img2ImgRequest, Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.settings import RuntimeSettings
from sdeks.errors import InvalidParameterError, ModelNotFoundError

OPTIONS = dict(DEFAULT_OPTIONS)


def square(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    return image


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def cn_models_root(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoints plus ControlNet/: SD 1.x folder and single file, a second SD 1.x
    model (another seed), an SDXL folder."""
    from runtime.tiny_controlnet import make_tiny_controlnet

    root = tmp_path_factory.mktemp("cn-models")
    shutil.copytree(tiny_models_dir, root, dirs_exist_ok=True)
    cn = root / "ControlNet"
    make_tiny_controlnet(cn / "tiny-cn-sd15", family="sd15")
    make_tiny_controlnet(cn / "tiny-cn-sd15-b", family="sd15", seed=1)
    make_tiny_controlnet(cn / "tiny-cn-sd15-file", family="sd15", single_file=True)
    make_tiny_controlnet(cn / "tiny-cn-sdxl", family="sdxl")
    return root


@pytest.fixture(scope="module")
def renderer(cn_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    cache = tmp_path_factory.mktemp("cn-cache")
    settings = RuntimeSettings(default_model="tiny-sd15", cache_dir=cache, max_images=4)
    store = ModelStore(LocalSource(cn_models_root), cache_dir=cache)
    return Renderer(store, settings)


def unit(**fields) -> dict:
    return {"module": "none", "model": "tiny-cn-sd15", "image": b64(square())} | fields


def t2i(*units: dict, key: str = "controlnet", **fields) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "seed": 7}
    scripts = {key: {"args": list(units)}} if units else {}
    return Txt2ImgRequest(**(base | {"alwayson_scripts": scripts} | fields))


def px(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def plain(renderer) -> np.ndarray:
    return px(renderer.txt2img(t2i(), options=OPTIONS))


def test_unit_changes_the_image_and_is_reproducible(renderer, plain):
    first = renderer.txt2img(t2i(unit()), options=OPTIONS)
    again = renderer.txt2img(t2i(unit()), options=OPTIONS)
    assert np.abs(px(first) - plain).max() > 8
    assert np.array_equal(px(first), px(again))
    params = infotext.parse(first.infotexts[0])
    assert params["ControlNet 0"] == (
        "Module: none, Model: tiny-cn-sd15, Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: -1, Threshold A: -1.0, Threshold B: -1.0, Guidance Start: 0.0, "
        "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"
    )
    assert first.info["extra_generation_params"]["ControlNet 0"] == params["ControlNet 0"]


@pytest.mark.parametrize(
    "scripts",
    [
        {"ControlNet": {"args": []}},
        {"controlnet": {"args": [unit(enabled=False)]}},
        {"controlnet": {"args": [unit(weight=0)]}},
    ],
    ids=["empty-args", "disabled", "weight-0"],
)
def test_no_op_units_give_the_image_without_controlnet(renderer, plain, scripts):
    result = renderer.txt2img(t2i(alwayson_scripts=scripts), options=OPTIONS)
    assert np.array_equal(px(result), plain)
    assert "ControlNet" not in result.infotexts[0]


def test_two_units_both_act(renderer):
    a = unit()
    b = unit(model="tiny-cn-sd15-b", image=b64(square(box=(0, 0, 30, 63))))
    only_a = px(renderer.txt2img(t2i(a), options=OPTIONS))
    only_b = px(renderer.txt2img(t2i(b), options=OPTIONS))
    both = renderer.txt2img(t2i(a, b), options=OPTIONS)
    assert np.abs(px(both) - only_a).max() > 4
    assert np.abs(px(both) - only_b).max() > 4
    assert "ControlNet 1" in infotext.parse(both.infotexts[0])


def test_guidance_end_stops_the_unit_for_the_last_steps(renderer):
    from runtime.controlnet import PROVIDER

    kind, _ = PROVIDER.support(renderer.models, renderer.settings)
    calls: list[int] = []
    with renderer.models.use_weights(kind, "tiny-cn-sd15") as lease:
        # On CPU the store hands every render the same (RAM) object.
        handle = lease.model.register_forward_hook(lambda *_: calls.append(1))
        try:
            full = px(renderer.txt2img(t2i(unit(), steps=4), options=OPTIONS))
            full_calls = len(calls)
            calls.clear()
            half = px(renderer.txt2img(t2i(unit(guidance_end=0.5), steps=4), options=OPTIONS))
            half_calls = len(calls)
        finally:
            handle.remove()
    assert full_calls == 4
    assert half_calls == 2  # steps 1-2 of 4 only
    assert not np.array_equal(full, half)


def test_control_modes_differ(renderer):
    images = [
        px(renderer.txt2img(t2i(unit(control_mode=mode)), options=OPTIONS)) for mode in (0, 1, 2)
    ]
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[1], images[2])


def test_single_file_controlnet_matches_folder_and_extension_names(renderer):
    folder = px(renderer.txt2img(t2i(unit()), options=OPTIONS))
    single = renderer.txt2img(t2i(unit(model="tiny-cn-sd15-file [0123abcd]")), options=OPTIONS)
    # Same seed-0 weights in both layouts (the single file in the original key layout).
    assert np.array_equal(px(single), folder)


def test_canny_preprocessor_and_img2img_inpaint(renderer):
    init = square().convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    base = {"prompt": "a cube", "steps": 3, "width": 64, "height": 64, "seed": 3}
    for extra in ({}, {"mask": b64(mask.convert("RGB"))}):
        without = Img2ImgRequest(**base, init_images=[b64(init)], **extra)
        # No unit image: img2img feeds the init image to the unit, as the extension does.
        scripts = {"controlnet": {"args": [unit(module="canny", image=None)]}}
        with_cn = Img2ImgRequest(**base, init_images=[b64(init)], alwayson_scripts=scripts, **extra)
        a = px(renderer.img2img(without, options=OPTIONS))
        result = renderer.img2img(with_cn, options=OPTIONS)
        assert np.abs(px(result) - a).max() > 2
        assert "Module: canny" in result.infotexts[0]
        assert "Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0" in result.infotexts[0]


def test_sdxl_controlnet_on_sdxl_checkpoint(renderer):
    sdxl = {"override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}
    plain = px(renderer.txt2img(t2i(**sdxl), options=OPTIONS))
    result = px(renderer.txt2img(t2i(unit(model="tiny-cn-sdxl"), **sdxl), options=OPTIONS))
    assert np.abs(result - plain).max() > 2


def test_sd15_controlnet_on_sdxl_checkpoint_fails_naming_both(renderer):
    sdxl = {"override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}
    with pytest.raises(InvalidParameterError, match="tiny-cn-sd15.*sd15 ControlNet"):
        renderer.txt2img(t2i(unit(), **sdxl), options=OPTIONS)


@pytest.mark.parametrize(
    ("fields", "error", "needle"),
    [
        ({"module": "no_such_module"}, InvalidParameterError, "'no_such_module'"),
        ({"model": "no-such-controlnet"}, ModelNotFoundError, "'no-such-controlnet'"),
        ({"model": "None"}, InvalidParameterError, "args[0].model"),
        ({"image": None}, InvalidParameterError, "args[0].image"),
        ({"image": "bm90IGFuIGltYWdl"}, InvalidParameterError, "args[0].image"),
        ({"weight": 3}, InvalidParameterError, "args[0].weight"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, InvalidParameterError, "guidance_start"),
    ],
)
def test_bad_unit_fails_naming_it(renderer, fields, error, needle):
    with pytest.raises(error) as info:
        renderer.txt2img(t2i(unit(**fields)), options=OPTIONS)
    assert needle in info.value.message


def test_hires_fix_runs_the_units_in_both_passes_unless_hr_option_says_otherwise(renderer):
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, "hr_upscaler": "Latent"}
    plain = renderer.txt2img(t2i(**hires), options=OPTIONS)
    both = renderer.txt2img(t2i(unit(), **hires), options=OPTIONS)
    low_only = renderer.txt2img(t2i(unit(hr_option="Low res only"), **hires), options=OPTIONS)
    assert both.images[0].size == (128, 128)
    assert not np.array_equal(px(both), px(plain))
    assert not np.array_equal(px(both), px(low_only))
    assert not np.array_equal(px(low_only), px(plain))
