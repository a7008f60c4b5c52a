"""The refiner (runtime/refiner.py): A1111's switch to another checkpoint's UNet."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runtime import infotext
from runtime.a1111 import Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from sdeks.errors import InvalidParameterError, ModelNotFoundError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    """The tiny models plus `tiny-refiner`: an SD 1.x model with other weights (seed 1)."""
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings
    from runtime.tiny import make_tiny

    root = tmp_path_factory.mktemp("models-refiner")
    shutil.copytree(tiny_models_dir / "Stable-diffusion", root / "Stable-diffusion")
    make_tiny(root / "Stable-diffusion" / "tiny-refiner", family="sd15", seed=1)
    store = ModelStore(LocalSource(root), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


def t2i(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "steps": 4, "width": 64, "height": 64, "seed": 9}
    return Txt2ImgRequest(**{**base, **fields})


def unet_calls(renderer: Renderer, request: Txt2ImgRequest) -> tuple[list[str], object]:
    """Which checkpoint's UNet ran each denoising step."""
    calls: list[str] = []
    hooks = []
    for name in ("tiny-sd15", "tiny-refiner"):
        with renderer.models.use(name) as lease:
            unet = lease.pipeline.unet
        hooks.append(unet.register_forward_hook(lambda *_a, n=name: calls.append(n)))
    try:
        result = renderer.txt2img(request, options=OPTIONS)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, result


def test_refiner_runs_the_last_steps_only(renderer):
    calls, result = unet_calls(
        renderer, t2i(refiner_checkpoint="tiny-refiner", refiner_switch_at=0.5)
    )
    assert calls == ["tiny-sd15", "tiny-sd15", "tiny-refiner", "tiny-refiner"]
    params = infotext.parse(result.infotexts[0])
    assert params["Refiner"] == "tiny-refiner" and params["Refiner switch at"] == "0.5"


def test_refiner_switch_points_and_no_refiner_values(renderer):
    at_70, _ = unet_calls(renderer, t2i(refiner_checkpoint="tiny-refiner", refiner_switch_at=0.7))
    assert at_70 == ["tiny-sd15"] * 3 + ["tiny-refiner"]
    from_start, _ = unet_calls(renderer, t2i(refiner_checkpoint="tiny-refiner"))
    assert from_start == ["tiny-refiner"] * 4
    for off in ({"refiner_checkpoint": ""}, {"refiner_checkpoint": None}, {"refiner_switch_at": 1}):
        calls, result = unet_calls(renderer, t2i(**{"refiner_checkpoint": "tiny-refiner", **off}))
        assert calls == ["tiny-sd15"] * 4 and "Refiner" not in result.infotexts[0]
    # after a refined render, the base model renders with its own UNet again
    calls, _ = unet_calls(renderer, t2i())
    assert calls == ["tiny-sd15"] * 4


def test_refiner_in_the_hires_pass(renderer):
    calls, result = unet_calls(
        renderer,
        t2i(
            enable_hr=True,
            denoising_strength=1.0,
            hr_second_pass_steps=2,
            refiner_checkpoint="tiny-refiner",
            refiner_switch_at=0.5,
        ),
    )
    # the first pass on the base; the hires pass's 2 steps: base, then refiner
    assert calls == ["tiny-sd15"] * 5 + ["tiny-refiner"]
    assert result.images[0].size == (128, 128)


def test_bad_refiners_name_the_field(renderer):
    with pytest.raises(ModelNotFoundError, match="ghost"):
        renderer.txt2img(t2i(refiner_checkpoint="ghost"), options=OPTIONS)
    with pytest.raises(InvalidParameterError, match="`refiner_switch_at`"):
        renderer.txt2img(
            t2i(refiner_checkpoint="tiny-refiner", refiner_switch_at=-1), options=OPTIONS
        )
    with pytest.raises(InvalidParameterError, match="`refiner_checkpoint` 'tiny-sdxl'"):
        renderer.txt2img(t2i(refiner_checkpoint="tiny-sdxl"), options=OPTIONS)


def test_a1111_refiner_script_in_alwayson_scripts(renderer):
    # GIVEN the Refiner entry a UI-state client sends: [enabled, checkpoint, switch_at]
    script = {"Refiner": {"args": [True, "tiny-refiner", 0.5]}}
    calls, result = unet_calls(renderer, t2i(alwayson_scripts=script))
    # THEN it switches as the body's own refiner fields do
    assert calls == ["tiny-sd15", "tiny-sd15", "tiny-refiner", "tiny-refiner"]
    assert infotext.parse(result.infotexts[0])["Refiner"] == "tiny-refiner"
    # switched off, or with "None"/"Use same checkpoint": the base model alone
    for args in ([False, "tiny-refiner", 0.5], [True, "None", 0.5], [True, "Use same checkpoint"]):
        calls, _ = unet_calls(renderer, t2i(alwayson_scripts={"Refiner": {"args": args}}))
        assert calls == ["tiny-sd15"] * 4
    calls, _ = unet_calls(renderer, t2i(refiner_checkpoint="Use same checkpoint"))
    assert calls == ["tiny-sd15"] * 4
