"""A1111 bodies as real clients send them (webuiapi, bots, chat apps, the extensions' own
API examples, old and new extension versions): parsed, not refused. Pure: no models."""

from __future__ import annotations

import pytest

from runtime import builtin_scripts
from runtime.a1111 import Txt2ImgRequest, ignored_fields, is_no_vae
from runtime.adetailer import ADetailerArgs, _filter, parse_args
from runtime.controlnet_units import parse_units
from runtime.detectors import Detection
from runtime.settings import RuntimeSettings
from runtime.stages.prepare import check_generation
from runtime.values import is_unset, lax_bool, lax_number
from sdeks.envelope import TaskType
from sdeks.errors import InvalidParameterError

# --- the shared helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, "", "  ", "None", "none", "Use same checkpoint", "Use same sampler", "Use same VAE"],
)
def test_unset_spellings(value):
    assert is_unset(value)


@pytest.mark.parametrize("value", ["tiny-sd15", "Euler a", 0, False, "Automatic"])
def test_set_values_are_not_unset(value):
    assert not is_unset(value)


def test_no_vae_takes_automatic_and_every_unset_spelling():
    assert all(is_no_vae(v) for v in ("Automatic", "None", "none", "", None))
    assert not is_no_vae("vae-ft-mse.safetensors")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), ("true", True), ("True", True), (1, True), ("1", True), ("false", False)]
    + [("False", False), (0, False), ("0", False), (False, False)],
)
def test_lax_bool(value, expected):
    assert lax_bool(value, "x") is expected


@pytest.mark.parametrize("value", ["maybe", 2, None, [], "tru"])
def test_lax_bool_refuses_the_rest_naming_the_field(value):
    with pytest.raises(InvalidParameterError, match="`a.b` must be true or false"):
        lax_bool(value, "a.b")


def test_lax_number():
    assert lax_number("0.5", "x") == 0.5 and lax_number(" 512 ", "x", integer=True) == 512
    assert lax_number(512.0, "x", integer=True) == 512
    for bad, needle in [
        ("nan", "must be a number"),
        ("inf", "must be a number"),
        (float("inf"), "must be a number"),
        ("half", "must be a number"),
        (True, "must be a number"),
        ("3", "between 0 and 2"),
    ]:
        with pytest.raises(InvalidParameterError, match=needle):
            lax_number(bad, "x", low=0, high=2)
    with pytest.raises(InvalidParameterError, match="`x` must be an integer"):
        lax_number("512.5", "x", integer=True)


# --- ControlNet units -------------------------------------------------------------


def unit(**fields):
    (one,) = parse_units({"controlnet": {"args": [fields]}})
    return one


def test_old_webuiapi_unit_with_alias_and_new_names_keeps_the_new_ones():
    # older webuiapi sends `guidance` beside `guidance_start`/`guidance_end`
    u = unit(guidance=1.0, guidance_start=0.2, guidance_end=0.7, lowvram=True, low_vram=False)
    assert (u.guidance_start, u.guidance_end, u.low_vram) == (0.2, 0.7, False)
    u = unit(input_image="b2xk", image="bmV3", mask_image="b2xkbQ==", mask="bmV3bQ==")
    assert (u.image, u.mask) == ("bmV3", "bmV3bQ==")


def test_an_alias_is_used_when_the_new_name_is_absent_none_or_empty():
    u = unit(input_image="b2xk", image=None, guidance=0.4, mask_image="bQ==", mask="")
    assert (u.image, u.mask, u.guidance_end) == ("b2xk", "bQ==", 0.4)
    u = unit(image="", input_image="b2xk")
    assert u.image == "b2xk"


def test_empty_image_strings_mean_no_image():
    u = unit(image="", input_image="", mask="", mask_image="")
    assert (u.image, u.mask) == (None, None)
    assert unit(image={"image": "aW1n", "mask": ""}).mask is None


def test_unit_booleans_and_numbers_as_text():
    u = unit(
        enabled="True",
        pixel_perfect="false",
        low_vram=1,
        weight="0.5",
        processor_res="512",
        guidance_start="0",
        guidance_end="1",
        threshold_a="100",
    )
    assert (u.enabled, u.pixel_perfect, u.low_vram) == (True, False, True)
    assert (u.weight, u.processor_res, u.guidance_end, u.threshold_a) == (0.5, 512, 1.0, 100.0)
    assert unit(enabled=0).enabled is False


# --- ADetailer ----------------------------------------------------------------------


def ad(**fields) -> list[ADetailerArgs]:
    return parse_args({"ADetailer": {"args": [True, False, {"ad_model": "face.pt", **fields}]}})


def test_tab_enable_current_name_and_old_misspelling():
    assert ad(ad_tab_enable=False) == [] and ad(ad_tap_enable=False) == []
    (one,) = ad(ad_tab_enable=True)
    assert one.ad_tab_enable is True
    (one,) = ad(ad_tab_enable="true", ad_tap_enable=True)
    assert one.ad_tab_enable is True
    with pytest.raises(InvalidParameterError, match="`ad_tap_enable`.*`ad_tab_enable`"):
        ad(ad_tab_enable=True, ad_tap_enable=False)


def test_mask_k_current_name_and_old_one():
    assert ad(ad_mask_k=2)[0].ad_mask_k == 2
    assert ad(ad_mask_k_largest=3)[0].ad_mask_k == 3
    assert ad(ad_mask_k="1", ad_mask_k_largest=1)[0].ad_mask_k == 1
    with pytest.raises(InvalidParameterError, match="different values"):
        ad(ad_mask_k=1, ad_mask_k_largest=2)


def test_a_current_clients_full_pass_parses():
    """Every field a current client (webuiapi, the extension's wiki example) sends."""
    body = {
        "ad_model": "face_yolov8n.pt",
        "ad_model_classes": "",
        "ad_tab_enable": True,
        "ad_prompt": "",
        "ad_negative_prompt": "",
        "ad_confidence": 0.3,
        "ad_mask_filter_method": "Area",
        "ad_mask_k": 0,
        "ad_mask_min_ratio": 0.0,
        "ad_mask_max_ratio": 1,
        "ad_dilate_erode": 4,
        "ad_x_offset": 0,
        "ad_y_offset": 0,
        "ad_mask_merge_invert": "None",
        "ad_mask_blur": 4,
        "ad_denoising_strength": 0.4,
        "ad_inpaint_only_masked": True,
        "ad_inpaint_only_masked_padding": 32,
        "ad_use_inpaint_width_height": False,
        "ad_inpaint_width": 512,
        "ad_inpaint_height": 512,
        "ad_use_steps": False,
        "ad_steps": 28,
        "ad_use_cfg_scale": False,
        "ad_cfg_scale": 7,
        "ad_use_checkpoint": True,
        "ad_checkpoint": "Use same checkpoint",
        "ad_use_vae": True,
        "ad_vae": "Use same VAE",
        "ad_use_sampler": True,
        "ad_sampler": "Use same sampler",
        "ad_scheduler": "Use same scheduler",
        "ad_use_noise_multiplier": True,
        "ad_noise_multiplier": 1,
        "ad_use_clip_skip": False,
        "ad_clip_skip": 1,
        "ad_restore_face": False,
        "ad_controlnet_model": "None",
        "ad_controlnet_module": "None",
        "ad_controlnet_weight": 1,
        "ad_controlnet_guidance_start": 0,
        "ad_controlnet_guidance_end": 1,
        # newer versions and forks
        "ad_prompt_append": "",
        "ad_negative_prompt_append": "",
        "ad_mask_bbox_expansion": 0,
        "ad_inpaint_masked_content": "original",
        "ad_controlnet_use_crop_input": True,
        "ad_hires_fix_only": False,
        "ad_inpaint_scale": 1.0,
        "ad_controlnet_guidance_start_end": [0.0, 1.0],
        "is_api": [],
    }
    (one,) = parse_args({"ADetailer": {"args": [True, False, body]}})
    assert one.ad_model == "face_yolov8n.pt" and one.ad_cfg_scale == 7.0


@pytest.mark.parametrize("is_api", [True, False, [], (), [1, 2], None])
def test_is_api_in_every_shape_clients_send(is_api):
    assert len(ad(is_api=is_api)) == 1


def test_booleans_and_numbers_as_text_and_the_pair():
    (one,) = ad(
        ad_confidence="0.5",
        ad_mask_blur="8",
        ad_inpaint_only_masked="false",
        ad_use_steps=1,
        ad_controlnet_guidance_start_end=["0.1", 0.9],
    )
    assert (one.ad_confidence, one.ad_mask_blur, one.ad_inpaint_only_masked) == (0.5, 8, False)
    assert one.ad_use_steps is True
    assert (one.ad_controlnet_guidance_start, one.ad_controlnet_guidance_end) == (0.1, 0.9)


def test_prompt_append():
    (one,) = ad(ad_prompt_append="detailed eyes", ad_negative_prompt_append="blurry")
    assert one.prompts("a cat, ", "ugly") == ("a cat, detailed eyes", "ugly, blurry")
    (one,) = ad(ad_prompt="[PROMPT], face", ad_prompt_append="smile")
    assert one.prompts("a cat", "")[0] == "a cat, face, smile"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"ad_colour": 1}, "`alwayson_scripts.ADetailer.args[2].ad_colour` is not an ADetailer"),
        ({"ad_confidence": "high"}, "ad_confidence` must be a number"),
        ({"ad_confidence": "nan"}, "ad_confidence` must be a number"),
        ({"ad_confidence": 2}, "ad_confidence` must be between 0 and 1"),
        ({"ad_mask_k": "1.5"}, "ad_mask_k` must be an integer"),
        ({"ad_use_steps": "sometimes"}, "ad_use_steps` must be true or false"),
        ({"ad_mask_filter_method": "Size"}, "ad_mask_filter_method` must be one of"),
        ({"ad_inpaint_masked_content": "zeros"}, "ad_inpaint_masked_content` must be one of"),
        ({"ad_mask_bbox_expansion": -4}, "ad_mask_bbox_expansion` must be between 0"),
        ({"ad_inpaint_scale": 1.5}, "ad_inpaint_scale`: an inpaint scale"),
        ({"ad_noise_multiplier": 1.6}, "ad_noise_multiplier` must be between 0.5 and 1.5"),
        ({"ad_controlnet_model": "cn.safetensors"}, "ControlNet inside ADetailer"),
        ({"ad_controlnet_guidance_start_end": [0.8, 0.2]}, "start 0.8 is greater"),
        ({"ad_controlnet_guidance_start_end": 0.5}, "must be [start, end]"),
        (
            {"ad_controlnet_guidance_start_end": [0, 1], "ad_controlnet_guidance_start": 0.3},
            "disagrees",
        ),
        ({"is_api": "yes"}, "is_api` must be"),
    ],
)
def test_bad_or_unsupported_values_are_refused_naming_the_field(fields, needle):
    with pytest.raises(InvalidParameterError) as info:
        ad(**fields)
    assert needle in info.value.message


def test_filter_method_keeps_the_largest_or_the_surest():
    big_unsure = Detection((0, 0, 30, 30), 0.4)
    small_sure = Detection((40, 40, 50, 50), 0.9)
    mid = Detection((0, 40, 20, 60), 0.6)
    dets = [small_sure, big_unsure, mid]
    (area,) = ad(ad_mask_k=2)
    assert _filter(dets, area, (64, 64)) == [big_unsure, mid]
    (conf,) = ad(ad_mask_k=2, ad_mask_filter_method="Confidence")
    assert _filter(dets, conf, (64, 64)) == [small_sure, mid]
    (all_,) = ad(ad_mask_filter_method="Confidence")
    assert _filter(dets, all_, (64, 64)) == dets


# --- alwayson_scripts: switched-off entries and A1111's built-in scripts ---------------


SETTINGS = RuntimeSettings()


@pytest.mark.parametrize(
    "entry",
    [{}, {"args": []}, {"args": None}, {"args": [False]}, {"args": [False, 0.5, "x"]}, []],
    ids=str,
)
def test_switched_off_unknown_scripts_are_no_ops(entry):
    request = Txt2ImgRequest(alwayson_scripts={"Dynamic Prompts v2.17.1": entry})
    check_generation(request, SETTINGS)
    content = {"prompt": "x", "alwayson_scripts": {"Dynamic Prompts v2.17.1": entry}}
    assert ignored_fields(TaskType.TEXT_TO_IMAGE, content, ["controlnet"]) == [
        "alwayson_scripts.Dynamic Prompts v2.17.1"
    ]


@pytest.mark.parametrize("entry", [{"args": [True]}, {"args": [{"enabled": True}]}], ids=str)
def test_an_enabled_unknown_script_is_refused_naming_it(entry):
    request = Txt2ImgRequest(alwayson_scripts={"Regional Prompter": entry})
    with pytest.raises(InvalidParameterError, match="Regional Prompter"):
        check_generation(request, SETTINGS)


def test_the_builtin_scripts_a_ui_client_sends_on_every_call_are_accepted():
    scripts = {
        "Refiner": {"args": [False, "", 0.8]},
        "Seed": {"args": [-1, False, -1, 0, 0, 0]},
        "Sampler": {"args": [20, "Euler a", "Automatic"]},
        "Extra options": {"args": []},
        "Soft inpainting": {"args": [False, 1, 0.5, 4, 0, 0.5, 2]},
    }
    request = Txt2ImgRequest(steps=20, sampler_name="Euler a", alwayson_scripts=scripts)
    builtin_scripts.apply(request)
    check_generation(request, SETTINGS)
    assert request.refiner_checkpoint is None and request.seed == -1 and request.steps == 20


def test_refiner_script_sets_the_refiner_fields():
    request = Txt2ImgRequest(alwayson_scripts={"Refiner": {"args": [True, "tiny-refiner", 0.5]}})
    builtin_scripts.apply(request)
    assert (request.refiner_checkpoint, request.refiner_switch_at) == ("tiny-refiner", 0.5)
    request = Txt2ImgRequest(alwayson_scripts={"Refiner": {"args": [True, "None", 0.5]}})
    builtin_scripts.apply(request)
    assert request.refiner_checkpoint is None
    conflict = Txt2ImgRequest(
        refiner_checkpoint="other", alwayson_scripts={"refiner": {"args": [True, "tiny", 0.5]}}
    )
    with pytest.raises(
        InvalidParameterError, match=r"refiner\.args\[1\]` sets `refiner_checkpoint"
    ):
        builtin_scripts.apply(conflict)


def test_seed_script_sets_seed_and_variation_fields():
    request = Txt2ImgRequest(
        alwayson_scripts={"Seed": {"args": [1234, True, 77, "0.25", 512, 768]}}
    )
    builtin_scripts.apply(request)
    assert (request.seed, request.subseed, request.subseed_strength) == (1234, 77, 0.25)
    assert (request.seed_resize_from_w, request.seed_resize_from_h) == (512, 768)
    # without the extra checkbox only the seed counts, as in A1111
    request = Txt2ImgRequest(alwayson_scripts={"Seed": {"args": [5, False, 77, 0.5, 0, 0]}})
    builtin_scripts.apply(request)
    assert (request.seed, request.subseed_strength) == (5, 0.0)
    # the body's own seed stands against the script's "random"
    request = Txt2ImgRequest(seed=42, alwayson_scripts={"Seed": {"args": [-1, False]}})
    builtin_scripts.apply(request)
    assert request.seed == 42
    with pytest.raises(InvalidParameterError, match=r"Seed\.args\[0\]` sets `seed`"):
        builtin_scripts.apply(Txt2ImgRequest(seed=42, alwayson_scripts={"Seed": {"args": [7]}}))
    with pytest.raises(InvalidParameterError, match=r"Seed\.args\[3\]` must be between 0 and 1"):
        builtin_scripts.apply(
            Txt2ImgRequest(alwayson_scripts={"Seed": {"args": [7, True, 1, 3, 0, 0]}})
        )


def test_sampler_script_and_enabled_unsupported_builtins():
    request = Txt2ImgRequest(alwayson_scripts={"Sampler": {"args": [12, "DPM++ 2M", "Karras"]}})
    builtin_scripts.apply(request)
    assert (request.steps, request.sampler_name, request.scheduler) == (12, "DPM++ 2M", "Karras")
    with pytest.raises(InvalidParameterError, match="Soft inpainting"):
        builtin_scripts.apply(
            Txt2ImgRequest(alwayson_scripts={"Soft inpainting": {"args": [True, 1, 0.5]}})
        )
    with pytest.raises(InvalidParameterError, match="must be a list"):
        builtin_scripts.apply(Txt2ImgRequest(alwayson_scripts={"Seed": {"args": 5}}))


@pytest.mark.parametrize("switch", ["false", "False", 0, False])
def test_adetailer_switch_sent_as_text_or_number_turns_it_off(switch):
    passes = parse_args({"ADetailer": {"args": [switch, "false", {"ad_model": "face_yolov8n.pt"}]}})
    assert passes == []


def test_adetailer_switch_sent_as_text_turns_it_on():
    (one,) = parse_args({"ADetailer": {"args": ["true", {"ad_model": "face_yolov8n.pt"}]}})
    assert one.ad_model == "face_yolov8n.pt"
    with pytest.raises(InvalidParameterError, match=r"args\[0\]"):
        parse_args({"ADetailer": {"args": ["maybe", {"ad_model": "face_yolov8n.pt"}]}})


def test_controlnet_modes_sent_as_digit_strings():
    (unit,) = parse_units(
        {"controlnet": {"args": [{"module": "canny", "resize_mode": "0", "control_mode": "2"}]}}
    )
    assert unit.resize_mode == "Just Resize"
    assert unit.control_mode == "ControlNet is more important"
    for other in ("7", "\uff12", "12", " "):  # out of range, a full-width 2, two digits
        with pytest.raises(InvalidParameterError, match="control_mode"):
            parse_units({"controlnet": {"args": [{"control_mode": other}]}})
