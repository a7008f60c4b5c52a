"""runtime/families.py: family detection and pipeline classes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.families import (
    PIPELINES,
    Family,
    derive,
    detect,
    detect_from_configs,
    detect_from_keys,
    parse_safetensors_header,
    pipeline_class,
    read_file_header,
)
from sdeks.errors import ModelLoadError

# The configs of the real checkpoints, as far as detection reads them.
SD15_UNET = {"cross_attention_dim": 768, "in_channels": 4}
SD15_TE = {"hidden_act": "quick_gelu", "hidden_size": 768}
SD2_UNET = {"cross_attention_dim": 1024, "in_channels": 4, "use_linear_projection": True}
SD2_TE = {"hidden_act": "gelu", "hidden_size": 1024}
SDXL_UNET = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "in_channels": 4}


@pytest.mark.parametrize(
    ("index", "unet", "te", "expected"),
    [
        ({"_class_name": "StableDiffusionPipeline"}, SD15_UNET, SD15_TE, Family("sd1")),
        ({"_class_name": "StableDiffusionPipeline"}, SD2_UNET, SD2_TE, Family("sd2")),
        # SD 2.x without a text encoder config: the 1024-wide cross-attention decides.
        ({"_class_name": "StableDiffusionPipeline"}, SD2_UNET, None, Family("sd2")),
        ({"_class_name": "StableDiffusionXLPipeline"}, SDXL_UNET, SD15_TE, Family("sdxl")),
        (
            {"_class_name": "StableDiffusionInpaintPipeline"},
            {**SD15_UNET, "in_channels": 9},
            SD15_TE,
            Family("sd1", inpainting=True),
        ),
    ],
)
def test_detect_from_configs_real_model_configs(index, unet, te, expected):
    assert detect_from_configs(index, unet, te) == expected


def test_detect_from_configs_rejects_other_pipelines():
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        detect_from_configs({"_class_name": "FluxPipeline"}, {}, None)


def test_detect_from_keys_sd2_by_cross_attention_width():
    # A file without text encoder weights (UNet-only extract) still shows SD 2.x
    # through the 1024-wide attn2 key projection, as diffusers checks it.
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (
            320,
            1024,
        ),
    }
    assert detect_from_keys(shapes) == Family("sd2")


def test_detect_from_keys_inpainting_and_sdxl():
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    }
    assert detect_from_keys(shapes) == Family("sdxl", inpainting=True)
    assert Family("sdxl", inpainting=True).label == "SDXL inpainting"


def test_the_sdxl_refiner_is_told_apart_in_both_layouts():
    # stabilityai's sd_xl_refiner_1.0 as a single file: OpenCLIP-G as the only embedder
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    }
    refiner = Family("sdxl", refiner=True)
    assert detect_from_keys(shapes) == refiner and refiner.label == "SDXL refiner"
    # its model_index.json: no first text encoder, aesthetic-score time ids
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "requires_aesthetics_score": True,
        "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    unet = {**SDXL_UNET, "cross_attention_dim": 1280}
    assert detect_from_configs(index, unet, None) == refiner
    assert detect_from_configs({**index, "requires_aesthetics_score": False}, unet) == refiner
    # an SDXL *img2img* base folder is no refiner
    base = {**index, "requires_aesthetics_score": False, "text_encoder": ["transformers", "X"]}
    assert detect_from_configs(base, SDXL_UNET) == Family("sdxl")
    # every pipeline kind of a refiner is the refiner-aware img2img class
    for kind in ("txt2img", "img2img", "inpaint"):
        assert pipeline_class(refiner, kind).__name__ == "StableDiffusionXLImg2ImgPipeline"


def test_detect_from_keys_rejects_non_checkpoints():
    # A LoRA file: tensors, but no UNet in the LDM layout.
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        detect_from_keys({"lora_unet_down_blocks_0.alpha": ()})
    with pytest.raises(ModelLoadError, match="no text encoder"):
        detect_from_keys({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)})


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sdxl-refiner"])
def test_detect_tiny_models_in_both_layouts(family: str, tmp_path: Path, request):
    from runtime.tiny import make_tiny

    expected = {
        "sd15": Family("sd1"),
        "sd2": Family("sd2"),
        "sdxl": Family("sdxl"),
        "sdxl-refiner": Family("sdxl", refiner=True),
    }[family]
    if family == "sd15":
        folder = request.getfixturevalue("tiny_sd15_dir")
    elif family == "sdxl":
        folder = request.getfixturevalue("tiny_sdxl_dir")
    else:
        folder = make_tiny(tmp_path / family, family=family)  # type: ignore[arg-type]
    single = make_tiny(tmp_path / f"{family}-single", family=family, single_file=True)  # type: ignore[arg-type]
    assert detect(folder) == expected
    assert detect(single) == expected


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_headers_of_corrupt_files_fail_as_model_load_failed(tmp_path: Path, tiny_sd15_file: Path):
    with pytest.raises(ModelLoadError) as info:
        read_file_header(_write(tmp_path / "short.safetensors", b"abc"))
    assert info.value.code == "model_load_failed"
    with pytest.raises(ModelLoadError, match="not a safetensors"):
        read_file_header(_write(tmp_path / "text.safetensors", b"hello world, not tensors" * 10))
    bad_json = struct.pack("<Q", 5) + b"{nope"
    with pytest.raises(ModelLoadError, match="not JSON"):
        parse_safetensors_header(bad_json)
    # A real checkpoint cut short: the header is fine, the tensors are not all there.
    data = tiny_sd15_file.read_bytes()
    with pytest.raises(ModelLoadError, match="truncated"):
        read_file_header(_write(tmp_path / "cut.safetensors", data[: len(data) // 2]))
    header = read_file_header(tiny_sd15_file)
    assert header["__metadata__"]["format"] == "pt"
    assert json.dumps(header)  # plain JSON all the way down


def test_pipeline_class_for_every_family_and_kind():
    for family, kinds in PIPELINES.items():
        for kind, name in kinds.items():
            assert pipeline_class(family, kind).__name__ == name
    with pytest.raises(ValueError, match="kind"):
        pipeline_class("sd1", "upscale")  # type: ignore[arg-type]


def _tiny_pipe(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_derive_shares_weights_and_renders_every_kind(tiny_sd15_dir: Path):
    from PIL import Image

    base = _tiny_pipe(tiny_sd15_dir)
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    args = dict(num_inference_steps=4, output_type="np")
    for kind in ("txt2img", "img2img", "inpaint"):
        pipe = derive(base, "sd1", kind)
        assert pipe.unet is base.unet and pipe.vae is base.vae
        assert pipe.scheduler is not base.scheduler
        g = torch.Generator().manual_seed(0)
        if kind == "txt2img":
            out = pipe("a cat", height=64, width=64, generator=g, **args)
        elif kind == "img2img":
            out = pipe("a cat", image=init, strength=0.5, generator=g, **args)
        else:
            out = pipe(
                "a cat", image=init, mask_image=mask, height=64, width=64, generator=g, **args
            )
        assert out.images[0].shape == (64, 64, 3)
        assert np.isfinite(out.images[0]).all()


def test_derive_keeps_half_precision_weights(tiny_sd15_dir: Path):
    # Regression guard: diffusers' from_pipe casts shared modules to fp32 unless
    # told the dtype; derive must leave a fp16 model's weights as they are.
    base = _tiny_pipe(tiny_sd15_dir).to(torch.float16)
    pipe = derive(base, "sd1", "img2img")
    assert pipe.unet.dtype == torch.float16
    assert base.unet.dtype == torch.float16 and base.text_encoder.dtype == torch.float16


def test_derive_sdxl_kinds(tiny_sdxl_dir: Path):
    base = _tiny_pipe(tiny_sdxl_dir)
    for kind in ("txt2img", "img2img", "inpaint"):
        pipe = derive(base, Family("sdxl"), kind)
        assert type(pipe).__name__ == PIPELINES["sdxl"][kind]
        assert pipe.text_encoder_2 is base.text_encoder_2


def test_importing_detection_and_catalog_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, runtime, runtime.families, runtime.model_catalog, runtime.model_source, "
        "runtime.model_disk, runtime.tiny; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
