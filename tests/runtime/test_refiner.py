"""The refiner (runtime/refiner.py): A1111's switch to another checkpoint's UNet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime import infotext
from runtime.a1111 import Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, Renderer
from sdeks.errors import InvalidParameterError, ModelNotFoundError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def models_root(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models plus `tiny-refiner`: an SD 1.x model with other weights (seed 1),
    and the SDXL refiner architecture as `tiny-sdxl-refiner` (folder) and
    `tiny-sdxl-refiner-file.safetensors` (single file, written by the CLI), same weights."""
    from runtime.tiny import make_tiny
    from sdeks.cli import main

    root = tmp_path_factory.mktemp("models-refiner")
    models = root / "Stable-diffusion"
    shutil.copytree(tiny_models_dir / "Stable-diffusion", models)
    make_tiny(models / "tiny-refiner", family="sd15", seed=1)
    make_tiny(models / "tiny-sdxl-refiner", family="sdxl-refiner", seed=1)
    single = str(models / "tiny-sdxl-refiner-file")
    assert main(["models", "make-tiny", single, "--family", "sdxl", "--kind", "refiner"]) == 0
    assert (
        main(
            [
                "models",
                "make-tiny",
                single,
                "--family",
                "sdxl",
                "--kind",
                "refiner",
                "--single-file",
            ]
        )
        == 0
    )
    shutil.rmtree(single)  # the folder the first call wrote; the single file stays
    from runtime.tiny_controlnet import make_tiny_controlnet

    make_tiny_controlnet(root / "ControlNet" / "tiny-cn-sdxl", family="sdxl")
    return root


@pytest.fixture(scope="module")
def renderer(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path_factory.mktemp("cache"))
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


# --- the SDXL refiner architecture ----------------------------------------------


def xl(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "negative_prompt": "blue", "steps": 5, "seed": 9}
    return t2i(**{**base, **fields})


def xl_calls(renderer: Renderer, request: Txt2ImgRequest, refiner: str = "tiny-sdxl-refiner"):
    """Which UNet ran each call ("base", "base+cn", "refiner"), and what the refiner's
    UNet was given."""
    calls: list[str] = []
    seen: list[dict] = []
    with renderer.models.use("tiny-sdxl") as lease:
        base = lease.pipeline.unet
    with renderer.models.use(refiner) as lease:
        ref = lease.pipeline.unet

    def on_refiner(_m, args, kwargs):
        calls.append("refiner")
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        added = kwargs["added_cond_kwargs"]
        seen.append(
            {
                "width": hidden.shape[-1],
                "rows": hidden.shape[0],
                "time_ids": added["time_ids"].tolist(),
                "text_embeds": added["text_embeds"].shape[-1],
                "negative_zero": bool((hidden[0] == 0).all()),
                "residuals": "down_block_additional_residuals" in kwargs,
            }
        )

    def on_base(_m, _args, kwargs):
        # "base+cn": the base UNet took ControlNet residuals
        calls.append("base+cn" if "down_block_additional_residuals" in kwargs else "base")

    hooks = [
        base.register_forward_pre_hook(on_base, with_kwargs=True),
        ref.register_forward_pre_hook(on_refiner, with_kwargs=True),
    ]
    try:
        result = renderer.txt2img(request, options={**OPTIONS, "sd_model_checkpoint": "tiny-sdxl"})
    finally:
        for hook in hooks:
            hook.remove()
    return calls, seen, result


def test_sdxl_refiner_denoises_from_the_switch_with_its_own_conditioning(renderer):
    # GIVEN an SDXL base and the SDXL refiner architecture, as A1111 clients send them
    request = xl(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.8)
    calls, seen, result = xl_calls(renderer, request)
    # THEN the base runs 4 of the 5 steps, the refiner the last one
    assert calls == ["base"] * 4 + ["refiner"]
    # with its own conditioning: its encoder's width (tiny: 64; the base's is 96), the
    # pooled projection, and time ids (h, w, crop, aesthetic score) for [negative, positive]
    assert seen == [
        {
            "width": 64,
            "rows": 2,
            "time_ids": [[64.0, 64.0, 0.0, 0.0, 2.5], [64.0, 64.0, 0.0, 0.0, 6.0]],
            "text_embeds": 32,
            "negative_zero": False,
            "residuals": False,
        }
    ]
    params = infotext.parse(result.infotexts[0])
    assert params["Refiner"] == "tiny-sdxl-refiner" and params["Refiner switch at"] == "0.8"
    plain = renderer.txt2img(xl(), options={**OPTIONS, "sd_model_checkpoint": "tiny-sdxl"})
    # the refined last step (at the lowest noise level) changed the image
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))
    # after it, the base renders alone again, and the same refined request repeats exactly
    again_calls, _, again = xl_calls(renderer, request)
    assert again_calls == calls
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    calls, _, _ = xl_calls(renderer, xl())
    assert calls == ["base"] * 5


def test_sdxl_refiner_aesthetic_scores_follow_a1111_options(renderer):
    # GIVEN A1111's refiner options in override_settings, and an empty negative prompt
    scores = {"sdxl_refiner_high_aesthetic_score": 7.5, "sdxl_refiner_low_aesthetic_score": 1}
    request = xl(
        negative_prompt="",
        refiner_checkpoint="tiny-sdxl-refiner",
        refiner_switch_at=0.8,
        override_settings=scores,
    )
    _, seen, _ = xl_calls(renderer, request)
    assert seen[0]["time_ids"] == [[64.0, 64.0, 0.0, 0.0, 1.0], [64.0, 64.0, 0.0, 0.0, 7.5]]
    assert seen[0]["negative_zero"]  # A1111 zeros an empty negative prompt's conds
    # a score that is no finite number is refused, naming the option
    bad = {"sdxl_refiner_low_aesthetic_score": "high"}
    with pytest.raises(InvalidParameterError, match="`sdxl_refiner_low_aesthetic_score`"):
        renderer.txt2img(
            xl(refiner_checkpoint="tiny-sdxl-refiner", override_settings=bad), options=OPTIONS
        )


def test_sdxl_refiner_from_the_first_step_and_in_the_hires_pass(renderer):
    # switch absent: the refiner from the first step (A1111), the base UNet never runs
    calls, seen, _ = xl_calls(renderer, xl(refiner_checkpoint="tiny-sdxl-refiner"))
    assert calls == ["refiner"] * 5 and {s["width"] for s in seen} == {64}
    # with the hires fix the switch is in the hires pass, at the upscaled size
    calls, seen, result = xl_calls(
        renderer,
        xl(
            steps=2,
            enable_hr=True,
            denoising_strength=1.0,
            hr_second_pass_steps=2,
            refiner_checkpoint="tiny-sdxl-refiner",
            refiner_switch_at=0.5,
        ),
    )
    assert calls == ["base"] * 3 + ["refiner"]
    assert seen[0]["time_ids"][1] == [128.0, 128.0, 0.0, 0.0, 6.0]
    assert result.images[0].size == (128, 128)


def test_sdxl_refiner_single_file_resolves_and_renders_as_the_folder(renderer):
    # GIVEN the same tiny refiner as an A1111 single .safetensors (+ its .config/ folder)
    entry = renderer.models.resolve("tiny-sdxl-refiner-file")
    assert entry.kind == "file"
    with renderer.models.use("tiny-sdxl-refiner-file") as lease:
        assert lease.family.refiner and lease.pipeline.text_encoder is None
    _, _, folder = xl_calls(
        renderer, xl(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.6)
    )
    calls, _, single = xl_calls(
        renderer,
        xl(refiner_checkpoint="tiny-sdxl-refiner-file", refiner_switch_at=0.6),
        refiner="tiny-sdxl-refiner-file",
    )
    assert calls == ["base"] * 3 + ["refiner"] * 2
    assert np.array_equal(np.asarray(folder.images[0]), np.asarray(single.images[0]))


def test_sdxl_refiner_is_refused_where_it_cannot_run(renderer):
    # an SD 1.x base: the refiner's conditioning does not fit it
    with pytest.raises(
        InvalidParameterError,
        match="`refiner_checkpoint` 'tiny-sdxl-refiner'.*SDXL refiner.*SD 1.x",
    ):
        renderer.txt2img(
            t2i(refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.8), options=OPTIONS
        )
    # a refiner as the base model: named as the field it came in
    with pytest.raises(
        InvalidParameterError, match="`sd_model_checkpoint` 'tiny-sdxl-refiner' is an SDXL refiner"
    ):
        renderer.txt2img(t2i(), options={**OPTIONS, "sd_model_checkpoint": "tiny-sdxl-refiner"})
    # nothing stays pinned by the refused renders
    assert renderer.models.state()["in_use"] == []


def test_a_refiner_file_without_its_config_folder_takes_the_shared_refiner_config(tmp_path):
    """`configs/sdxl_refiner/` serves every single-file SDXL refiner, as `configs/sdxl/`
    serves the SDXL bases (the image ships both, from stabilityai's repositories)."""
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.tiny import make_tiny, single_file_config_dir

    models = tmp_path / "models"
    path = make_tiny(
        models / "Stable-diffusion" / "refiner", family="sdxl-refiner", single_file=True
    )
    shutil.move(single_file_config_dir(path), models / "configs" / "sdxl_refiner")
    store = ModelStore(LocalSource(models), cache_dir=tmp_path / "cache")
    with store.use("refiner") as lease:
        assert lease.family.refiner and lease.family.label == "SDXL refiner"
        assert lease.pipeline.config.requires_aesthetics_score


def test_sdxl_refiner_through_the_a1111_api(renderer, models_root: Path):
    """What A1111 clients post: an SDXL base and `sd_xl_refiner_1.0`-style names."""
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.settings import RuntimeSettings

    settings = RuntimeSettings(default_model="tiny-sd15", models=str(models_root))
    body = {
        "prompt": "a red cube",
        "steps": 5,
        "width": 64,
        "height": 64,
        "seed": 9,
        "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
        "refiner_checkpoint": "tiny-sdxl-refiner-file.safetensors",
        "refiner_switch_at": 0.8,
    }
    with TestClient(create_app(settings, models=renderer.models)) as client:
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        params = infotext.parse(json.loads(response.json()["info"])["infotexts"][0])
        assert params["Model"] == "tiny-sdxl" and params["Refiner switch at"] == "0.8"
        assert params["Refiner"] == "tiny-sdxl-refiner-file.safetensors"
        # an SD 1.x base with the SDXL refiner: a clear error naming the field
        bad = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {}})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_parameter"
        assert "`refiner_checkpoint`" in bad.json()["detail"]
        # the refiner's options persist through /options, checked before they are kept
        name = "sdxl_refiner_high_aesthetic_score"
        assert client.get("/sdapi/v1/options").json()[name] == 6.0
        refused = client.post("/sdapi/v1/options", json={name: "x"})
        assert refused.status_code == 422 and f"`{name}`" in refused.json()["detail"]
        assert client.get("/sdapi/v1/options").json()[name] == 6.0


def test_aesthetic_score_options_are_finite_numbers():
    from runtime.options import validate_options

    name = "sdxl_refiner_low_aesthetic_score"
    assert validate_options({name: 3})[name] == 3
    for value in (True, "2.5", 1e6, -1e4, None, [1]):
        with pytest.raises(InvalidParameterError, match=f"`{name}`"):
            validate_options({name: value})
    # NaN and Infinity (Python's JSON parser reads them) are refused as data, not a crash
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidParameterError, match="NaN and Infinity"):
            validate_options({name: value})


def test_a_controlnet_unit_drives_the_base_steps_only(renderer):
    """The base model's ControlNet residuals are sized for the base UNet: the SDXL
    refiner's steps run without them, as A1111's ControlNet leaves the refiner alone."""
    import base64
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=(255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    unit = {
        "module": "none",
        "model": "tiny-cn-sdxl",
        "image": base64.b64encode(buf.getvalue()).decode(),
    }
    request = xl(
        refiner_checkpoint="tiny-sdxl-refiner",
        refiner_switch_at=0.6,
        alwayson_scripts={"controlnet": {"args": [unit]}},
    )
    calls, seen, result = xl_calls(renderer, request)
    assert calls == ["base+cn"] * 3 + ["refiner"] * 2
    assert [s["residuals"] for s in seen] == [False, False] and seen[0]["width"] == 64
    assert "ControlNet 0" in result.infotexts[0]
