"""Hires fix (runtime/hires.py) on the tiny models: sizes, steps, upscalers, infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import infotext
from runtime.a1111 import Txt2ImgRequest
from runtime.control import JobControl
from runtime.render import DEFAULT_OPTIONS, Renderer
from sdeks.errors import InvalidParameterError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


def hr(**fields) -> Txt2ImgRequest:
    base = {
        "prompt": "a red cube",
        "steps": 3,
        "width": 64,
        "height": 64,
        "seed": 5,
        "enable_hr": True,
        "denoising_strength": 0.5,
    }
    return Txt2ImgRequest(**{**base, **fields})


def steps_reported(renderer: Renderer, request: Txt2ImgRequest) -> tuple[list[int], int, object]:
    done: list[int] = []
    control = JobControl(job_id="hr", on_progress=lambda d, _t: done.append(d))
    result = renderer.txt2img(request, options=OPTIONS, control=control)
    return done, control.steps, result


def test_hires_doubles_the_first_pass_and_runs_the_second_pass_steps(renderer):
    # GIVEN webuiapi's hires body: hr_scale 2, hr_second_pass_steps 0 (= steps), "Latent"
    done, total, result = steps_reported(
        renderer, hr(hr_scale=2, hr_second_pass_steps=0, hr_upscaler="Latent")
    )
    # THEN the image is hr_scale x the first pass, and both passes' steps ran:
    # 3 first-pass steps + int(3 x 0.5) = 1 second-pass step
    assert result.images[0].size == (128, 128)
    assert total == 4 and done == [1, 2, 3, 4]
    params = infotext.parse(result.infotexts[0])
    assert params["Size"] == "64x64"
    assert params["Denoising strength"] == "0.5"
    assert params["Hires upscale"] == "2.0"
    assert params["Hires upscaler"] == "Latent"
    assert "Hires steps" not in params
    assert result.info["width"] == 64 and result.info["denoising_strength"] == 0.5
    assert result.info["extra_generation_params"]["Hires upscale"] == 2.0


def test_hires_second_pass_steps_and_resize(renderer):
    done, total, result = steps_reported(
        renderer,
        hr(hr_second_pass_steps=4, hr_resize_x=96, hr_resize_y=0, denoising_strength=0.75),
    )
    assert result.images[0].size == (96, 96)
    assert total == 3 + 3 and done[-1] == 6  # int(4 x 0.75) second-pass steps
    params = infotext.parse(result.infotexts[0])
    assert params["Hires resize"] == "96x0" and params["Hires steps"] == "4"
    assert "Hires upscale" not in params


def test_hires_resize_to_another_aspect_crops_to_exactly_that_size(renderer):
    result = renderer.txt2img(hr(hr_resize_x=128, hr_resize_y=64), options=OPTIONS)
    assert result.images[0].size == (128, 64)


def test_hires_second_pass_changes_the_image(renderer):
    # The upscale alone (strength 0: no second-pass steps) against upscale + second pass.
    done, total, upscaled = steps_reported(
        renderer, hr(hr_upscaler="Lanczos", denoising_strength=0.0)
    )
    refined = renderer.txt2img(hr(hr_upscaler="Lanczos", denoising_strength=0.6), options=OPTIONS)
    assert total == 3 and done == [1, 2, 3]
    assert upscaled.images[0].size == refined.images[0].size == (128, 128)
    a, b = np.asarray(upscaled.images[0], float), np.asarray(refined.images[0], float)
    assert np.abs(a - b).mean() > 1


@pytest.mark.parametrize(
    "upscaler",
    [
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
        "None",
        "Nearest",
    ],
)
def test_every_a1111_latent_mode_and_builtin_upscaler(renderer, upscaler):
    result = renderer.txt2img(hr(hr_upscaler=upscaler, hr_scale=1.5), options=OPTIONS)
    assert result.images[0].size == (96, 96)
    assert infotext.parse(result.infotexts[0])["Hires upscaler"] == upscaler


def test_hires_sampler_prompt_and_same_values(renderer):
    same = renderer.txt2img(
        hr(
            hr_sampler_name="Use same sampler",
            hr_checkpoint_name="Use same checkpoint",
            hr_scheduler="",
            hr_prompt="",
        ),
        options=OPTIONS,
    )
    plain = renderer.txt2img(hr(), options=OPTIONS)
    assert np.array_equal(np.asarray(same.images[0]), np.asarray(plain.images[0]))
    other = renderer.txt2img(
        hr(hr_sampler_name="DPM++ 2M", hr_prompt="a blue sphere"), options=OPTIONS
    )
    params = infotext.parse(other.infotexts[0])
    assert params["Hires sampler"] == "DPM++ 2M" and params["Hires prompt"] == "a blue sphere"
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(plain.images[0]))


def test_hires_sampler_starts_from_the_checkpoints_scheduler_not_the_renders(renderer, monkeypatch):
    """A Karras first pass must not hand its sigmas to a Uniform hires sampler."""
    from diffusers import EulerDiscreteScheduler

    seen: list[bool] = []
    original = EulerDiscreteScheduler.set_timesteps

    def spy(self, *args, **kwargs):
        seen.append(bool(self.config.get("use_karras_sigmas")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EulerDiscreteScheduler, "set_timesteps", spy)
    renderer.txt2img(
        hr(
            sampler_name="DPM++ 2M",
            scheduler="Karras",
            hr_sampler_name="Euler",
            hr_scheduler="Uniform",
        ),
        options=OPTIONS,
    )
    assert seen and not any(seen)  # the hires pass ran Euler, without Karras sigmas
    seen.clear()
    renderer.txt2img(
        hr(
            sampler_name="DPM++ 2M",
            scheduler="Uniform",
            hr_sampler_name="Euler",
            hr_scheduler="Karras",
        ),
        options=OPTIONS,
    )
    assert seen and all(seen)  # and an asked-for Karras hires schedule still is one


def test_hires_checkpoint_renders_the_second_pass_with_it(renderer):
    result = renderer.txt2img(hr(hr_checkpoint_name="tiny-sd15-single"), options=OPTIONS)
    assert infotext.parse(result.infotexts[0])["Hires checkpoint"] == "tiny-sd15-single"
    assert result.images[0].size == (128, 128)


def test_hires_scale_one_is_no_hires_and_disabled_fields_are_ignored(renderer):
    plain = renderer.txt2img(hr(enable_hr=False, hr_upscaler="nonsense"), options=OPTIONS)
    same_size = renderer.txt2img(hr(hr_scale=1.0), options=OPTIONS)
    assert same_size.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(same_size.images[0]), np.asarray(plain.images[0]))
    assert "Hires upscale" not in same_size.infotexts[0]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        # (the tiny bucket holds "R-ESRGAN 4x+", not the Anime6B model)
        (
            {"hr_upscaler": "R-ESRGAN 4x+ Anime6B"},
            "`hr_upscaler` 'R-ESRGAN 4x+ Anime6B' is not installed",
        ),
        ({"hr_scale": 100}, "hires fix target 6400x6400"),
        ({"hr_scale": -1}, "`hr_scale` must be a positive number"),
        ({"hr_second_pass_steps": -2}, "`hr_second_pass_steps`"),
        ({"hr_sampler_name": "Nope"}, "`hr_sampler_name` 'Nope'"),
        ({"hr_checkpoint_name": "ghost"}, "ghost"),
    ],
)
def test_bad_hires_fields_name_the_field(renderer, fields, needle):
    with pytest.raises(Exception) as info:
        renderer.txt2img(hr(**fields), options=OPTIONS)
    assert needle in str(info.value)
    if "ghost" not in fields.values():
        assert isinstance(info.value, InvalidParameterError)


def test_none_spellings_of_the_hires_fields_mean_the_first_passs(renderer):
    # GIVEN a client that sends "None" for the hires checkpoint and sampler (the old UI
    # values) - THEN it renders as a body without them, instead of "model 'None' not found"
    none = renderer.txt2img(
        hr(hr_checkpoint_name="None", hr_sampler_name="None", hr_scheduler="none"),
        options=OPTIONS,
    )
    plain = renderer.txt2img(hr(), options=OPTIONS)
    assert np.array_equal(np.asarray(none.images[0]), np.asarray(plain.images[0]))
    assert "Hires checkpoint" not in none.infotexts[0]
