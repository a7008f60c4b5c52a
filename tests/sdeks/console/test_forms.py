"""The submit form -> envelope: every field checked and named, nothing fixed up."""

from __future__ import annotations

import pytest

from sdeks.console.forms import CONSOLE_PREFIX, FormError, build_envelope


def form(**fields):
    return {"runtime": "sdruntime", "model": "tiny-sd15", "prompt": "a cat", **fields}


def test_build_envelope_makes_a_canonical_text_to_image_task():
    body, task = build_envelope(
        form(width="128", height=96, steps="12", seed="42", batch_size="2", negative_prompt="dog")
    )
    assert task.runtime == "sdruntime" and task.tasktype == "text-to-image"
    assert task.prefix == CONSOLE_PREFIX and task.id.startswith(f"{CONSOLE_PREFIX}-")
    assert task.model == "tiny-sd15"
    assert task.content == {
        "prompt": "a cat",
        "negative_prompt": "dog",
        "width": 128,
        "height": 96,
        "steps": 12,
        "seed": 42,
        "batch_size": 2,
        "alwayson_scripts": {"sd_model_checkpoint": "tiny-sd15"},
    }
    assert body == task.to_envelope()


def test_build_envelope_defaults_absent_numbers_and_leaves_out_an_empty_model():
    _, task = build_envelope({"runtime": "sdruntime", "model": ""})
    assert task.model is None
    assert (task.content["width"], task.content["steps"], task.content["seed"]) == (512, 20, -1)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"runtime": ""}, "runtime", "is required"),
        ({"runtime": "Bad Runtime!"}, "form", "runtime"),
        ({"width": "100"}, "width", "multiple of 8"),
        ({"height": "4096"}, "height", "between 64 and 2048"),
        ({"steps": "0"}, "steps", "between 1 and 150"),
        ({"steps": "ten"}, "steps", "whole number"),
        ({"steps": 2.5}, "steps", "whole number"),
        ({"seed": True}, "seed", "whole number"),
        ({"batch_size": "9"}, "batch_size", "between 1 and 8"),
        ({"prompt": "x" * 4001}, "prompt", "at most 4000"),
        ({"prompt": ["a"]}, "prompt", "must be text"),
        ({"model": {"x": 1}}, "model", "must be text"),
    ],
)
def test_build_envelope_refuses_a_bad_field_by_name(fields, field, words):
    with pytest.raises(FormError) as caught:
        build_envelope(form(**fields))
    assert caught.value.field == field
    assert words in caught.value.message
    assert caught.value.to_error()["code"] == "invalid_form"


def test_build_envelope_refuses_a_form_that_is_not_an_object():
    with pytest.raises(FormError):
        build_envelope(["runtime"])  # type: ignore[arg-type]
