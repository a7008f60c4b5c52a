"""ControlNet unit parsing: the extension's fields, defaults, aliases and value spellings."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime import preprocessors
from runtime.controlnet_units import parse_units
from sdeks.errors import InvalidParameterError, ModelLoadError


def units(*args, key="controlnet"):
    return parse_units({key: {"args": list(args)}})


def test_defaults_are_the_extensions():
    (unit,) = units({})
    assert unit.enabled is True  # the released extension's API default (its PR #2912)
    assert (unit.module, unit.model, unit.weight) == ("none", "None", 1.0)
    assert unit.resize_mode == "Crop and Resize"
    assert unit.control_mode == "Balanced"
    assert (unit.processor_res, unit.threshold_a, unit.threshold_b) == (-1, -1.0, -1.0)
    assert (unit.guidance_start, unit.guidance_end, unit.pixel_perfect) == (0.0, 1.0, False)


def test_aliases_ints_and_old_spellings():
    (unit,) = units(
        {
            "input_image": "aW1n",
            "mask_image": "bWFzaw==",
            "guidance": 0.5,
            "lowvram": True,
            "resize_mode": "Inner Fit (Scale to Fit)",
            "control_mode": 2,
        },
        key="ControlNet",
    )
    assert (unit.image, unit.mask, unit.guidance_end, unit.low_vram) == (
        "aW1n",
        "bWFzaw==",
        0.5,
        True,
    )
    assert unit.resize_mode == "Crop and Resize"
    assert unit.control_mode == "ControlNet is more important"
    (unit,) = units({"image": {"image": "aW1n", "mask": "bWFzaw=="}, "resize_mode": 3})
    assert (unit.image, unit.mask, unit.resize_mode) == ("aW1n", "bWFzaw==", "Just Resize")


def test_empty_and_missing_args_are_no_ops():
    assert parse_units({}) == []
    assert parse_units({"ControlNet": {"args": []}}) == []
    assert parse_units({"controlnet": {}}) == []


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ({"weight": 2.5}, "args[0].weight` must be between 0 and 2"),
        ({"weight": "heavy"}, "args[0].weight` must be a number"),
        ({"weight": "nan"}, "args[0].weight` must be a number"),
        ({"weight": "2.5"}, "args[0].weight` must be between 0 and 2"),
        ({"processor_res": "512.5"}, "args[0].processor_res` must be an integer"),
        ({"enabled": "maybe"}, "args[0].enabled` must be true or false"),
        ({"enabled": 2}, "args[0].enabled` must be true or false"),
        ({"resize_mode": "Stretch"}, "args[0].resize_mode"),
        ({"control_mode": 5}, "args[0].control_mode"),
        ({"guidance_start": 0.9, "guidance_end": 0.1}, "guidance_start` (0.9) is greater"),
        ({"image": 12}, "args[0].image"),
        ("not a unit", "args[0]` must be a unit object"),
    ],
)
def test_bad_fields_are_refused_naming_them(arg, needle):
    with pytest.raises(InvalidParameterError) as info:
        units(arg)
    assert needle in info.value.message


def test_too_many_units_refused():
    with pytest.raises(InvalidParameterError, match="over the limit"):
        units(*[{}] * 9)


def test_infotext_is_the_extensions_serialization():
    (unit,) = units({"module": "canny", "model": "m [abcd1234]", "weight": 1, "threshold_a": 100})
    assert unit.infotext() == (
        "Module: canny, Model: m [abcd1234], Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: -1, Threshold A: 100.0, Threshold B: -1.0, Guidance Start: 0.0, "
        "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"
    )


def _square() -> Image.Image:
    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(200, 200, 200))
    return image


@pytest.mark.parametrize(
    "module",
    [
        "none",
        "invert",
        "canny",
        "threshold",
        "binary",
        "blur_gaussian",
        "tile_resample",
        "scribble_xdog",
        "lineart_standard",
    ],
)
def test_weight_free_preprocessors_run(module):
    out = preprocessors.detect(_square(), module, processor_res=64)
    assert out.image.mode == "RGB" and min(out.image.size) >= 8


def test_preprocessor_values_and_defaults():
    inverted = np.asarray(preprocessors.detect(_square(), "invert", processor_res=64).image)
    assert inverted[0, 0].tolist() == [255, 255, 255] and inverted[32, 32].tolist() == [55] * 3
    canny = preprocessors.detect(_square(), "canny")
    assert (canny.processor_res, canny.threshold_a, canny.threshold_b) == (512, 100, 200)
    mask = np.asarray(
        preprocessors.detect(_square(), "threshold", processor_res=64, threshold_a=100).image
    )
    assert mask[32, 32].tolist() == [255] * 3 and mask[0, 0].tolist() == [0] * 3


def test_model_based_preprocessor_with_bucket_weights(tmp_path):
    """softedge_pidinet through controlnet_aux with (random) weights from the bucket folder."""
    import torch
    from controlnet_aux.pidi.model import pidinet

    torch.manual_seed(0)
    weights = tmp_path / "ControlNet" / "annotators" / "table5_pidinet.pth"
    weights.parent.mkdir(parents=True)
    torch.save({"state_dict": pidinet().state_dict()}, weights)
    asked = []

    def fetch(key):
        asked.append(key)
        return tmp_path / key

    annotators = preprocessors.Annotators(fetch)
    out = preprocessors.detect(
        _square(), "softedge_pidinet", processor_res=64, annotators=annotators
    )
    assert asked == ["ControlNet/annotators/table5_pidinet.pth"]
    assert out.image.size[0] >= 64


@pytest.mark.parametrize(
    "content",
    ["other-layout", b"truncated"],
)
def test_annotator_weights_that_do_not_load_fail_naming_the_file(tmp_path, content):
    """A file of another layout (or no checkpoint at all) fails the unit with
    model_load_failed naming the file, not an unhandled KeyError (HTTP 500)."""
    import torch

    weights = tmp_path / "ControlNet" / "annotators" / "table5_pidinet.pth"
    weights.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        weights.write_bytes(content)
    else:
        torch.save({"state_dict": {"not_a_pidinet_key": torch.zeros(1)}}, weights)
    annotators = preprocessors.Annotators(lambda key: tmp_path / key)
    with pytest.raises(ModelLoadError) as caught:
        preprocessors.detect(_square(), "softedge_pidinet", processor_res=64, annotators=annotators)
    assert "ControlNet/annotators/table5_pidinet.pth" in caught.value.message
    assert caught.value.code == "model_load_failed"


def test_a_switched_off_script_is_a_no_op():
    assert units(False) == [] and units(False, {"enabled": True}) == []
