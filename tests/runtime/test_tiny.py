"""runtime/tiny.py: tiny random models that load and render offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def _render(pipe, *, seed: int = 1, size: int = 64) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a cat wizard",
        negative_prompt="blue",
        num_inference_steps=4,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images[0]


def test_tokenizer_keeps_its_in_code_vocabulary():
    from runtime.tiny import make_tokenizer

    tok = make_tokenizer()
    # transformers 5 silently builds a 2-token vocabulary from file arguments;
    # ours must hold the byte alphabet, the merged words and the specials.
    assert len(tok.get_vocab()) > 512
    ids = tok("a cat wizard").input_ids
    assert ids[0] == tok.get_vocab()["<|startoftext|>"]
    assert ids[-1] == tok.get_vocab()["<|endoftext|>"]
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "cat</w>", "wizard</w>"]


def test_make_tiny_sd15_folder_renders_64x64(tiny_sd15_dir: Path):
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_sd15_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    size = sum(p.stat().st_size for p in tiny_sd15_dir.rglob("*") if p.is_file())
    assert size < 8 * 2**20

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, local_files_only=True)
    image = _render(pipe)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0
    # Same seed, same pixels on the same device.
    np.testing.assert_array_equal(image, _render(pipe))
    assert not np.array_equal(image, _render(pipe, seed=2))


def test_make_tiny_sdxl_folder_renders_64x64(tiny_sdxl_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    assert pipe.text_encoder_2 is not None
    image = _render(pipe)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_make_tiny_weights_are_deterministic_per_seed():
    from runtime.tiny import build_tiny_pipeline

    a = build_tiny_pipeline("sd15", seed=3).unet.state_dict()
    b = build_tiny_pipeline("sd15", seed=3).unet.state_dict()
    c = build_tiny_pipeline("sd15", seed=4).unet.state_dict()
    key = "conv_in.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


def test_make_tiny_single_file_uses_ldm_layout_and_sibling_config(tiny_sd15_file: Path):
    from safetensors import safe_open

    from runtime.tiny import single_file_config_dir

    assert tiny_sd15_file.suffix == ".safetensors"
    with safe_open(str(tiny_sd15_file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.conv_in.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    config = single_file_config_dir(tiny_sd15_file)
    assert (config / "model_index.json").is_file()
    assert (config / "tokenizer" / "tokenizer.json").is_file()
    assert not list(config.rglob("*.safetensors")), "the config folder carries no weights"


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_single_file_and_folder_of_same_weights_give_same_image(
    family: str, tmp_path: Path, tiny_sd15_dir: Path, tiny_sd15_file: Path
):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from runtime.tiny import make_tiny, single_file_config_dir

    if family == "sd15":
        folder, single = tiny_sd15_dir, tiny_sd15_file
    else:  # SD 2.x: OpenCLIP text encoder in the single file; SDXL: two encoders
        folder = make_tiny(tmp_path / family, family=family, seed=5)  # type: ignore[arg-type]
        single = make_tiny(tmp_path / "single", family=family, seed=5, single_file=True)  # type: ignore[arg-type]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    from_folder = cls.from_pretrained(folder, local_files_only=True)
    from_file = cls.from_single_file(
        str(single), config=str(single_file_config_dir(single)), local_files_only=True
    )
    np.testing.assert_array_equal(_render(from_folder), _render(from_file))
