"""The sampler table: name resolution (pure) and every mapped sampler running for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import samplers
from sdeks.errors import InvalidParameterError


@pytest.mark.parametrize(
    ("name", "scheduler", "sampler", "followed", "label"),
    [
        ("DPM++ 2M Karras", None, "DPM++ 2M", "karras", "Automatic"),
        ("DPM++ 2M", "Karras", "DPM++ 2M", "karras", "Automatic"),
        ("DPM++ 2M", None, "DPM++ 2M", "karras", "Automatic"),
        ("DPM++ 2M", "Uniform", "DPM++ 2M", "uniform", "Uniform"),
        ("DPM++ 2M SDE Exponential", None, "DPM++ 2M SDE", "exponential", "Automatic"),
        ("DPM++ 2M SDE Karras", None, "DPM++ 2M SDE", "karras", "Karras"),
        ("DPM++ SDE Karras", None, "DPM++ SDE", "karras", "Automatic"),
        ("Euler a", None, "Euler a", "uniform", "Automatic"),
        ("k_euler_a", None, "Euler a", "uniform", "Automatic"),
        ("euler", "sgm_uniform", "Euler", "sgm_uniform", "SGM Uniform"),
        ("Euler", "Simple", "Euler", "simple", "Simple"),  # Forge's default schedule type
        ("LMS Karras", None, "LMS", "karras", "Karras"),
        (None, None, "Euler", "uniform", "Automatic"),
    ],
)
def test_resolve_old_and_new_forms(name, scheduler, sampler, followed, label):
    choice = samplers.resolve(name, scheduler)
    assert choice.sampler.name == sampler
    assert choice.schedule.name == followed
    assert choice.schedule_label == label


def test_resolve_maps_to_diffusers_kwargs():
    choice = samplers.resolve("DPM++ 2M SDE Karras")
    assert choice.scheduler_class == "DPMSolverMultistepScheduler"
    assert choice.scheduler_kwargs == {
        "algorithm_type": "sde-dpmsolver++",
        "use_karras_sigmas": True,
    }


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "Restart", "nonsense"])
def test_unsupported_sampler_lists_the_supported(name):
    with pytest.raises(InvalidParameterError) as info:
        samplers.resolve(name)
    assert repr(name) in info.value.message
    for supported in samplers.supported_names():
        assert supported in info.value.message


def test_simple_schedule_is_trailing_spacing():
    """A1111's Simple steps through the model's sigma table evenly from its end."""
    choice = samplers.resolve("Euler a", "Simple")
    assert choice.scheduler_kwargs == {"timestep_spacing": "trailing"}
    assert "Simple" in [s.label for s in samplers.SCHEDULES]


def test_unsupported_schedule_is_refused():
    with pytest.raises(InvalidParameterError, match="Align Your Steps"):
        samplers.resolve("Euler", "Align Your Steps")
    with pytest.raises(InvalidParameterError, match="not supported with sampler 'Euler a'"):
        samplers.resolve("Euler a Karras")


def all_choices() -> list[tuple[str, str]]:
    pairs = []
    for sampler in samplers.SAMPLERS:
        for schedule in samplers.SCHEDULES:
            if schedule.name == "automatic" or schedule.name in sampler.schedules:
                pairs.append((sampler.name, schedule.label))
    return pairs


@pytest.mark.parametrize(("sampler", "schedule"), all_choices())
def test_every_choice_builds_a_diffusers_scheduler(sampler, schedule):
    import inspect

    import diffusers

    choice = samplers.resolve(sampler, schedule)
    cls = getattr(diffusers, choice.scheduler_class)
    accepted = inspect.signature(cls.__init__).parameters
    for key in choice.scheduler_kwargs:
        assert key in accepted, f"{cls.__name__} does not take {key}"


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.render import Renderer
    from runtime.settings import RuntimeSettings

    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, RuntimeSettings(default_model="tiny-sd15"))


@pytest.mark.parametrize("sampler", samplers.supported_names())
def test_every_sampler_renders_reproducibly(renderer, sampler):
    from runtime.a1111 import Txt2ImgRequest
    from runtime.render import DEFAULT_OPTIONS

    request = Txt2ImgRequest(
        prompt="a cube", steps=3, width=64, height=64, seed=9, batch_size=2, sampler_name=sampler
    )
    first = renderer.txt2img(request, options=DEFAULT_OPTIONS)
    again = renderer.txt2img(request, options=DEFAULT_OPTIONS)

    assert first.info["sampler_name"] == sampler
    assert f"Sampler: {sampler}," in first.infotexts[0]
    for a, b in zip(first.images, again.images, strict=True):
        pixels = np.asarray(a)
        assert a.size == (64, 64) and np.isfinite(pixels).all()
        assert np.array_equal(pixels, np.asarray(b))
