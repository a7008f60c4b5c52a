"""Rendering with real diffusers pipelines over the tiny random models (CPU, 64x64, 2-4 steps)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import infotext
from runtime.a1111 import ExtrasSingleImageRequest, Img2ImgRequest, Txt2ImgRequest
from runtime.render import DEFAULT_OPTIONS, JobControl, Renderer, encode_png
from runtime.settings import RuntimeSettings
from sdeks.errors import (
    InvalidParameterError,
    ModelNotFoundError,
    OutOfMemoryError,
    TaskCancelledError,
)

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def models_root(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models plus a LoRA and a VAE file (diffusers and LDM layouts)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from runtime.model_ldm import vae_to_ldm

    root = tmp_path_factory.mktemp("models-extra")
    shutil.copytree(tiny_models_dir / "Stable-diffusion", root / "Stable-diffusion")
    (root / "Lora").mkdir()
    (root / "VAE").mkdir()
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_models_dir / "Stable-diffusion" / "tiny-sd15"
    )
    torch.manual_seed(1)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    StableDiffusionPipeline.save_lora_weights(
        root / "Lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    (root / "Lora" / "pytorch_lora_weights.safetensors").rename(root / "Lora" / "tiny.safetensors")
    (root / "Lora" / "broken.safetensors").write_bytes(b"not a safetensors file")
    from runtime.tiny_embeddings import make_tiny_embedding

    make_tiny_embedding(root / "embeddings" / "shiny-style", family="sd15", seed=1)
    vae_state = {k: v * 1.5 for k, v in pipe.vae.state_dict().items()}
    save_file(vae_state, str(root / "VAE" / "bright.safetensors"))
    save_file(
        vae_to_ldm(vae_state, dict(pipe.vae.config)), str(root / "VAE" / "bright-ldm.safetensors")
    )
    return root


@pytest.fixture(scope="module")
def renderer(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    settings = RuntimeSettings(default_model="tiny-sd15", max_pixels=256 * 256, max_images=8)
    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path_factory.mktemp("cache"))
    return Renderer(store, settings)


def t2i(**fields) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "seed": 11}
    return Txt2ImgRequest(**(base | fields))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def png_b64(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode()


def test_txt2img_same_seed_same_pixels_and_numbering(renderer):
    first = renderer.txt2img(t2i(batch_size=2, n_iter=2), options=OPTIONS)
    again = renderer.txt2img(t2i(batch_size=2, n_iter=2), options=OPTIONS)

    assert first.seeds == [11, 12, 13, 14]
    assert first.info["all_seeds"] == [11, 12, 13, 14]
    assert [infotext.parse(t)["Seed"] for t in first.infotexts] == ["11", "12", "13", "14"]
    for a, b in zip(first.images, again.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    # Image i depends on its own seed only, not on its place in the batch.
    alone = renderer.txt2img(t2i(seed=13), options=OPTIONS)
    assert np.abs(pixels(alone.images[0]) - pixels(first.images[2])).max() <= 1
    assert not np.array_equal(pixels(first.images[0]), pixels(first.images[1]))


def test_txt2img_random_seed_is_reported_and_reproduces(renderer):
    result = renderer.txt2img(t2i(seed=-1), options=OPTIONS)
    seed = result.info["seed"]
    assert 0 <= seed < 2**32
    again = renderer.txt2img(t2i(seed=seed), options=OPTIONS)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_variation_seed_moves_with_strength(renderer):
    base = renderer.txt2img(t2i(subseed=99, subseed_strength=0.0), options=OPTIONS).images[0]
    full = renderer.txt2img(t2i(seed=99), options=OPTIONS).images[0]
    result = renderer.txt2img(t2i(subseed=99, subseed_strength=0.5, batch_size=2), options=OPTIONS)
    # A1111: with a variation strength every image keeps the seed, subseeds count up.
    assert result.info["all_seeds"] == [11, 11]
    assert result.info["all_subseeds"] == [99, 100]
    assert "Variation seed: 99, Variation seed strength: 0.5" in result.infotexts[0]
    half = result.images[0]
    assert not np.array_equal(pixels(half), pixels(base))
    at_one = renderer.txt2img(t2i(subseed=99, subseed_strength=1.0), options=OPTIONS).images[0]
    assert np.abs(pixels(at_one) - pixels(full)).max() <= 1


def test_img2img_and_variation(renderer):
    init = renderer.txt2img(t2i(), options=OPTIONS).images[0].resize((96, 80))
    request = Img2ImgRequest(
        prompt="a blue cube", steps=4, width=64, height=64, seed=5, init_images=[png_b64(init)]
    )
    result = renderer.img2img(request, options=OPTIONS)
    again = renderer.img2img(request, options=OPTIONS)
    varied = renderer.img2img(
        request.model_copy(update={"subseed": 3, "subseed_strength": 0.7}), options=OPTIONS
    )

    assert result.images[0].size == (64, 64)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(result.images[0]), pixels(varied.images[0]))
    assert infotext.parse(result.infotexts[0])["Denoising strength"] == "0.75"
    assert result.info["denoising_strength"] == 0.75


def test_img2img_denoising_zero_keeps_the_image(renderer):
    init = Image.new("RGB", (64, 64), (10, 200, 30))
    request = Img2ImgRequest(
        steps=4, width=64, height=64, init_images=[png_b64(init)], denoising_strength=0.0
    )
    out = renderer.img2img(request, options=OPTIONS).images[0]
    # Only the VAE round trip of a random tiny VAE: same size, finite pixels.
    assert out.size == (64, 64)


@pytest.mark.parametrize(("invert", "full_res"), [(0, True), (1, True), (0, False)])
def test_inpaint_with_mask(renderer, invert, full_res):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    request = Img2ImgRequest(
        steps=4,
        width=64,
        height=64,
        seed=3,
        init_images=[png_b64(init)],
        mask=png_b64(mask.convert("RGB")),
        inpainting_mask_invert=invert,
        inpaint_full_res=full_res,
        inpaint_full_res_padding=4,
        inpainting_fill=1,
        denoising_strength=0.9,
        batch_size=2,
    )
    result = renderer.img2img(request, options=OPTIONS)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert "Mask blur: 4" in result.infotexts[0]
    if full_res and not invert:
        # Only the masked box (plus padding and blur) is repainted; the corners stay.
        corner = np.asarray(result.images[0])[:8, :8].astype(int)
        assert np.abs(corner - np.array([200, 30, 30])).max() <= 2


def test_sdxl_and_sd15_switch(renderer):
    xl = renderer.txt2img(t2i(), options=OPTIONS, model="tiny-sdxl")
    single = renderer.txt2img(t2i(), options=OPTIONS, model="tiny-sd15-single.safetensors")
    folder = renderer.txt2img(t2i(), options=OPTIONS, model="tiny-sd15")
    assert xl.info["sd_model_name"] == "tiny-sdxl"
    assert single.info["sd_model_name"] == "tiny-sd15-single"
    # The same weights as one LDM file and as a diffusers folder render the same pixels.
    assert np.abs(pixels(single.images[0]) - pixels(folder.images[0])).max() <= 1
    assert "Model: tiny-sdxl" in xl.infotexts[0]
    assert xl.images[0].size == (64, 64)


def test_override_settings_checkpoint_and_clip_skip(renderer):
    plain = renderer.txt2img(t2i(), options=OPTIONS)
    skipped = renderer.txt2img(
        t2i(override_settings={"CLIP_stop_at_last_layers": 2}), options=OPTIONS
    )
    assert "Clip skip: 2" in skipped.infotexts[0]
    assert skipped.info["clip_skip"] == 2
    assert not np.array_equal(pixels(plain.images[0]), pixels(skipped.images[0]))
    xl = renderer.txt2img(
        t2i(override_settings={"sd_model_checkpoint": "tiny-sdxl", "CLIP_stop_at_last_layers": 2}),
        options=OPTIONS,
    )
    assert xl.info["sd_model_name"] == "tiny-sdxl" and xl.info["clip_skip"] == 2


@pytest.mark.parametrize("vae", ["bright", "bright-ldm"])
def test_sd_vae_from_the_vae_folder(renderer, vae):
    plain = renderer.txt2img(t2i(), options=OPTIONS)
    result = renderer.txt2img(t2i(override_settings={"sd_vae": vae}), options=OPTIONS)
    assert f"VAE: {vae}" in result.infotexts[0]
    assert not np.array_equal(pixels(plain.images[0]), pixels(result.images[0]))


def test_sd_vae_is_loaded_once_per_checkpoint_when_its_hash_becomes_known(
    models_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from runtime import vae as vae_module
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    # GIVEN a fresh store whose hash of the checkpoint is not known yet
    store = ModelStore(LocalSource(models_root), cache_dir=tmp_path / "cache")
    renderer = Renderer(store, RuntimeSettings(default_model="tiny-sd15"))
    loads = []
    real_load_vae = vae_module.load_vae

    def counting_load_vae(*args, **kwargs):
        loads.append(args[0])
        return real_load_vae(*args, **kwargs)

    monkeypatch.setattr(vae_module, "load_vae", counting_load_vae)
    request = t2i(override_settings={"sd_vae": "bright"})
    with monkeypatch.context() as hold:
        hold.setattr(store, "_hash_local", lambda *_: None)  # the background hash, held off
        first = renderer.txt2img(request, options=OPTIONS)
    assert first.model == "tiny-sd15"

    # WHEN the hash becomes known (the title changes) and the VAE is used again
    sha256 = store.ensure_hash("tiny-sd15")
    assert sha256
    again = renderer.txt2img(request, options=OPTIONS)

    # THEN the VAE file was loaded once, and both renders used it
    assert again.model == f"tiny-sd15 [{sha256[:10]}]"
    assert len(loads) == 1
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_prompt_lora_changes_pixels_and_is_unloaded(renderer):
    plain = renderer.txt2img(t2i(), options=OPTIONS)
    with_lora = renderer.txt2img(t2i(prompt="a red cube <lora:tiny:0.8>"), options=OPTIONS)
    after = renderer.txt2img(t2i(), options=OPTIONS)

    assert not np.array_equal(pixels(plain.images[0]), pixels(with_lora.images[0]))
    assert np.array_equal(pixels(plain.images[0]), pixels(after.images[0]))
    assert "<lora:tiny:0.8>" in infotext.parse(with_lora.infotexts[0])["Prompt"]
    assert 'Lora hashes: "tiny: 0.8"' in with_lora.infotexts[0]


def _shared_weights_state(renderer: Renderer) -> dict:
    """What a render may change in the shared tiny-sd15 weights, as plain values."""
    from runtime.tiling import conv_layers

    with renderer.models.use("tiny-sd15") as lease:
        pipe = lease.pipeline
        return {
            "padding": sorted({layer.padding_mode for layer in conv_layers(pipe)}),
            "adapters": sorted(getattr(pipe.unet, "peft_config", None) or {}),
            "vocab": len(pipe.tokenizer.get_vocab()),
            "embedding_rows": pipe.text_encoder.get_input_embeddings().weight.shape[0],
            "unet_sum": float(sum(p.double().sum() for p in pipe.unet.parameters())),
        }


@pytest.mark.parametrize(
    ("prompt", "fields", "needle"),
    [
        # the refiner is refused in the last step of stage 2, after LoRA, embedding and tiling
        (
            "a red cube shiny-style <lora:tiny:0.8>",
            {"tiling": True, "refiner_checkpoint": "tiny-sdxl"},
            "`refiner_checkpoint` 'tiny-sdxl' has another architecture",
        ),
        # the second LoRA fails to load after the first is in the shared UNet
        ("a red cube <lora:tiny:0.8> <lora:broken:1>", {}, "`prompt` LoRA 'broken'"),
    ],
)
def test_a_render_failing_in_stage_2_leaves_the_shared_weights_as_they_were(
    renderer, prompt, fields, needle
):
    plain = renderer.txt2img(t2i(), options=OPTIONS)
    before = _shared_weights_state(renderer)
    pinned_before = renderer.models.state()["in_use"]

    with pytest.raises(InvalidParameterError) as info:
        renderer.txt2img(t2i(prompt=prompt, **fields), options=OPTIONS)
    assert needle in info.value.message

    assert _shared_weights_state(renderer) == before
    assert renderer.models.state()["in_use"] == pinned_before  # the refiner's lease is gone
    after = renderer.txt2img(t2i(), options=OPTIONS)
    assert np.array_equal(pixels(plain.images[0]), pixels(after.images[0]))


def test_missing_lora_and_model_are_clear(renderer):
    with pytest.raises(ModelNotFoundError, match="nosuch"):
        renderer.txt2img(t2i(prompt="x <lora:nosuch:1>"), options=OPTIONS)
    with pytest.raises(ModelNotFoundError, match="ghost"):
        renderer.txt2img(t2i(), options=OPTIONS, model="ghost [abc123]")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"width": 60}, "`width` must be a positive multiple of 8, got 60"),
        ({"height": 0}, "`height`"),
        ({"width": 512, "height": 512}, "over the limit of 65536"),
        ({"steps": 0}, "`steps` must be between 1 and 150, got 0"),
        ({"batch_size": 9}, "`batch_size`"),
        ({"batch_size": 4, "n_iter": 3}, "over the limit of 8 images"),
        ({"cfg_scale": -1}, "`cfg_scale`"),
        ({"seed": -5}, "`seed`"),
        ({"subseed_strength": 2}, "`subseed_strength`"),
        ({"sampler_name": "Restart"}, "supported samplers: DPM++ 2M"),
        ({"scheduler": "Align Your Steps"}, "`scheduler`"),
        ({"enable_hr": True, "hr_upscaler": "4x-Nope"}, "`hr_upscaler` '4x-Nope'"),
        ({"alwayson_scripts": {"Regional Prompter": {"args": [True]}}}, "Regional Prompter"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 40}}, "CLIP_stop_at_last_layers"),
        (
            {"alwayson_scripts": {"sd_model_checkpoint": 5}},
            "`alwayson_scripts.sd_model_checkpoint` must be a string, got 5",
        ),
        (
            {"override_settings": {"sd_model_checkpoint": ["tiny-sd15"]}},
            "`override_settings.sd_model_checkpoint` must be a string, got ['tiny-sd15']",
        ),
    ],
)
def test_bad_parameters_name_field_and_value(renderer, fields, needle):
    with pytest.raises(InvalidParameterError) as info:
        renderer.txt2img(t2i(**fields), options=OPTIONS)
    assert needle in info.value.message


def test_routing_key_in_alwayson_scripts_is_not_a_script(renderer):
    result = renderer.txt2img(
        t2i(alwayson_scripts={"sd_model_checkpoint": "tiny-sd15"}), options=OPTIONS
    )
    assert len(result.images) == 1


def test_bad_images_name_the_field(renderer):
    for images, needle in ((["!!!"], "init_images[0]"), ([], "init_images")):
        with pytest.raises(InvalidParameterError, match=needle.replace("[", r"\[")):
            renderer.img2img(
                Img2ImgRequest(init_images=images, width=64, height=64), options=OPTIONS
            )
    big = Image.new("RGB", (1200, 1200))
    renderer_settings = renderer.settings.model_copy(update={"max_upscale_pixels": 1000 * 1000})
    small = Renderer(renderer.models, renderer_settings)
    with pytest.raises(InvalidParameterError, match="over the limit"):
        small.img2img(
            Img2ImgRequest(init_images=[png_b64(big)], width=64, height=64), options=OPTIONS
        )


def test_cancel_between_steps(renderer):
    control = JobControl(job_id="c1")

    def stop_after_first(*_a):
        pass

    control.cancel()
    with pytest.raises(TaskCancelledError):
        renderer.txt2img(t2i(steps=4), options=OPTIONS, control=control)
    assert control.step == 0


def test_out_of_memory_becomes_a_task_error(renderer, monkeypatch):
    import torch

    def boom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(renderer, "_denoise", boom)
    with pytest.raises(OutOfMemoryError, match="out of"):
        renderer.txt2img(t2i(), options=OPTIONS)
    monkeypatch.undo()
    assert len(renderer.txt2img(t2i(), options=OPTIONS).images) == 1  # still serving


@pytest.mark.parametrize(
    ("upscaler", "mode", "size"),
    [("Lanczos", 0, (64, 32)), ("Nearest", 0, (64, 32)), ("None", 1, (40, 40))],
)
def test_extras_upscale(renderer, upscaler, mode, size):
    image = Image.new("RGB", (32, 16), (1, 2, 3))
    request = ExtrasSingleImageRequest(
        image=png_b64(image),
        upscaler_1=upscaler,
        resize_mode=mode,
        upscaling_resize=2,
        upscaling_resize_w=40,
        upscaling_resize_h=40,
    )
    result = renderer.extras(request)
    assert result.images[0].size == size
    assert f"Postprocess upscaler: {upscaler}" in result.infotexts[0]


def test_extras_unknown_upscaler_lists_available(renderer):
    request = ExtrasSingleImageRequest(
        image=png_b64(Image.new("RGB", (8, 8))), upscaler_1="ESRGAN_4x"
    )
    with pytest.raises(InvalidParameterError, match="ESRGAN_4x.*Lanczos, Nearest"):
        renderer.extras(request)


def test_png_carries_parameters_chunk(renderer):
    result = renderer.txt2img(t2i(negative_prompt="blurry, low"), options=OPTIONS)
    image = Image.open(io.BytesIO(encode_png(result.images[0], result.infotexts[0])))
    parsed = infotext.parse(image.info["parameters"])
    assert parsed["Negative prompt"] == "blurry, low"
    assert parsed["Steps"] == "3"
    assert parsed["Size"] == "64x64"
    assert parsed["Sampler"] == "Euler"


def test_emphasis_and_long_prompts_render(renderer):
    plain = renderer.txt2img(t2i(prompt="a red cube"), options=OPTIONS)
    emphasised = renderer.txt2img(t2i(prompt="a (red:1.6) cube"), options=OPTIONS)
    long_prompt = ", ".join(["a red cube"] * 40) + " BREAK blue sky"
    long = renderer.txt2img(t2i(prompt=long_prompt, negative_prompt="(blurry)"), options=OPTIONS)

    assert not np.array_equal(pixels(plain.images[0]), pixels(emphasised.images[0]))
    assert infotext.parse(emphasised.infotexts[0])["Prompt"] == "a (red:1.6) cube"
    assert long.images[0].size == (64, 64)


def test_dynamic_models_off_pins_the_default_model(renderer):
    pinned = Renderer(
        renderer.models, renderer.settings.model_copy(update={"dynamic_models": False})
    )
    assert len(pinned.txt2img(t2i(), options=OPTIONS, model="tiny-sd15").images) == 1
    with pytest.raises(InvalidParameterError, match="serves only its default model 'tiny-sd15'"):
        pinned.txt2img(t2i(), options=OPTIONS, model="tiny-sdxl")


def test_eks_sample_legacy_keys_are_not_scripts_and_sd_vae_selects_the_vae(renderer):
    legacy = {"task": "text-to-image", "id_task": "t1", "uid": "123", "save_dir": "outputs"}
    with_vae = renderer.txt2img(
        t2i(alwayson_scripts={**legacy, "sd_model_checkpoint": "tiny-sd15", "sd_vae": "bright"}),
        options=OPTIONS,
    )
    as_override = renderer.txt2img(t2i(override_settings={"sd_vae": "bright"}), options=OPTIONS)
    plain = renderer.txt2img(t2i(alwayson_scripts=legacy), options=OPTIONS)

    assert with_vae.info["sd_vae_name"] == "bright"
    assert np.array_equal(pixels(with_vae.images[0]), pixels(as_override.images[0]))
    assert not np.array_equal(pixels(with_vae.images[0]), pixels(plain.images[0]))


def test_legacy_image_link_becomes_init_images(renderer):
    init = png_b64(Image.new("RGB", (64, 64), (200, 30, 30)))
    linked = Img2ImgRequest(
        alwayson_scripts={"image_link": init, "task": "image-to-image"},
        prompt="p",
        steps=2,
        width=64,
        height=64,
        seed=3,
        denoising_strength=0.0,
    )
    result = renderer.img2img(linked, options=OPTIONS)
    assert pixels(result.images[0])[0, 0].tolist() == [200, 30, 30]
    url = Img2ImgRequest(
        alwayson_scripts={"image_link": "https://example.test/a.png"}, steps=2, width=64, height=64
    )
    with pytest.raises(InvalidParameterError, match=r"`init_images\[0\]` is a link"):
        renderer.img2img(url, options=OPTIONS)
