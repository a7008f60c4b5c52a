"""Tiny random Stable Diffusion models, built offline from configs.

Used by the tests, the local stack and `sdeks models make-tiny`: real diffusers
components (UNet2DConditionModel, AutoencoderKL, CLIP text encoders, a CLIP
BPE tokenizer, a scheduler) at toy sizes, with seeded random weights, so the
whole pipeline runs on a laptop CPU in milliseconds and needs no hub.

Layouts written (the models bucket layout of docs/models.md):

- folder (default): ``dest/`` is a diffusers folder with ``model_index.json``;
  upload it as ``Stable-diffusion/<name>/``.
- single file: ``dest`` (``.safetensors`` added when missing) holds the
  weights in the original LDM key layout, and ``<dest stem>.config/`` beside
  it holds the diffusers configs, tokenizer and scheduler without weights -
  the per-checkpoint config folder the model store uses to load a single file
  with no network (`from_single_file(path, config=...)`). Upload both under
  ``Stable-diffusion/``.

The same `seed` gives the same weights in both layouts, so a folder and a
single file built with one seed render the same pixels.

Families: "sd15", "sd2", "sdxl", and "sdxl-refiner", the architecture of
the SDXL refiner (OpenCLIP encoder alone, aesthetic-score time ids) for
`refiner_checkpoint` with a tiny SDXL base.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

Family = Literal["sd15", "sd2", "sdxl", "sdxl-refiner"]

#: The families `build_tiny_pipeline` knows.
FAMILIES: tuple[Family, ...] = ("sd15", "sd2", "sdxl", "sdxl-refiner")

log = logging.getLogger(__name__)

#: Suffix of the per-checkpoint config folder next to a single-file checkpoint.
SINGLE_FILE_CONFIG_SUFFIX = ".config"

# Latent 8x smaller than the image, like real SD: a 64x64 render is an 8x8 latent.
_VAE_BLOCKS = (8, 16, 16, 16)
_SAMPLE_SIZE = 8  # latent side at the default 64x64


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable-character table (the byte-level BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# A handful of merges so common prompt words become single tokens, as with the
# real 49k vocabulary; merges may only use tokens already in the vocabulary.
_WORDS = ("cat", "dog", "wizard", "photo", "red", "blue", "a", "of", "the")


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    known = set(tokens)
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if merged not in known:
                merges.append(pair)
                tokens.append(merged)
                known.add(merged)
            parts = [merged, *parts[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def make_tokenizer(dest: Path | None = None) -> Any:
    """A CLIP BPE tokenizer from the in-code vocabulary, saved to `dest` when given.

    transformers 5 ignores `vocab_file=`/`merges_file=` in the constructor (it
    silently builds a 2-token vocabulary), so the vocabulary goes in as data.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    # The BPE backend wants (left, right) tuples; the annotation says strings, which it rejects.
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]
    if dest is not None:
        tok.save_pretrained(str(dest))
    return tok


def _text_config(*, hidden: int, vocab_size: int, eos: int, bos: int, act: str) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act=act,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=list(_VAE_BLOCKS),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(_VAE_BLOCKS),
        up_block_types=["UpDecoderBlock2D"] * len(_VAE_BLOCKS),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=_SAMPLE_SIZE * 8,
    )


def _unet(family: Family, cross_attention_dim: int) -> Any:
    from diffusers import UNet2DConditionModel

    common: dict[str, Any] = dict(
        sample_size=_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=16,
    )
    if family in ("sdxl", "sdxl-refiner"):
        # SDXL conditions on pooled text embeddings + 6 size/crop numbers
        # ("text_time"): 32 (text_encoder_2 projection) + 6 * 8 = 80. The
        # refiner's time ids are 5 numbers (size, crop, aesthetic score): 32 + 5 * 8.
        return UNet2DConditionModel(
            **common,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80 if family == "sdxl" else 72,
        )
    if family == "sd2":
        return UNet2DConditionModel(**common, attention_head_dim=(2, 4), use_linear_projection=True)
    return UNet2DConditionModel(**common, attention_head_dim=8)


def _scheduler(family: Family) -> Any:
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    # The schedules of the real models (SD 1.x/2.x ship PNDM, SDXL Euler).
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if family in ("sdxl", "sdxl-refiner"):
        return EulerDiscreteScheduler(**common, timestep_spacing="leading")
    return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)


def build_tiny_pipeline(family: Family = "sd15", *, seed: int = 0) -> Any:
    """The tiny pipeline in memory, float32 on CPU, deterministic for `seed`.

    "sdxl-refiner" is the architecture of stabilityai's SDXL refiner: only the
    OpenCLIP text encoder (`text_encoder_2`), cross-attention as wide as it,
    time ids with an aesthetic score (`requires_aesthetics_score`), in a
    `StableDiffusionXLImg2ImgPipeline` as the refiner's `model_index.json` has.
    """
    import torch
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    tokenizer = make_tokenizer()
    vocab = tokenizer.get_vocab()
    ids = dict(vocab_size=len(vocab), eos=vocab["<|endoftext|>"], bos=vocab["<|startoftext|>"])
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # Each component from its own seeded generator state, so adding a component
    # to one family never shifts the weights of another.
    def seeded(offset: int) -> None:
        torch.manual_seed(seed * 1000 + offset)

    pipe: Any
    if family == "sdxl-refiner":
        seeded(2)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(hidden=64, act="gelu", **ids))
        seeded(3)
        unet = _unet(family, cross_attention_dim=64)
        seeded(4)
        vae = _vae()
        vae.register_to_config(scaling_factor=0.13025, force_upcast=False)
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=make_tokenizer(),
            unet=unet,
            scheduler=_scheduler(family),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    elif family == "sdxl":
        # The two encoders must differ in width: diffusers tells SDXL's CLIP-L
        # and OpenCLIP-G apart in a single file by their embedding sizes.
        seeded(1)
        text_encoder = CLIPTextModel(_text_config(hidden=32, act="quick_gelu", **ids))
        seeded(2)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(hidden=64, act="gelu", **ids))
        seeded(3)
        unet = _unet(family, cross_attention_dim=32 + 64)
        seeded(4)
        vae = _vae()
        vae.register_to_config(scaling_factor=0.13025, force_upcast=False)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=make_tokenizer(),
            unet=unet,
            scheduler=_scheduler(family),
            add_watermarker=False,
        )
    else:
        act = "gelu" if family == "sd2" else "quick_gelu"
        seeded(1)
        text_encoder = CLIPTextModel(_text_config(hidden=32, act=act, **ids))
        seeded(3)
        unet = _unet(family, cross_attention_dim=32)
        seeded(4)
        vae = _vae()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(family),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _quiet_saves() -> Iterator[None]:
    """transformers 5 draws a "Writing model shards" bar per text encoder saved."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_config_folder(pipe: Any, dest: Path) -> None:
    """The diffusers folder minus weights: what `from_single_file(config=...)` reads."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        with _quiet_saves():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        for weights in tmp.rglob("*.safetensors"):
            weights.unlink()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_tiny(
    dest: Path,
    *,
    family: Family = "sd15",
    single_file: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny random model to `dest` and return the path to upload.

    Folder: `dest` becomes a diffusers folder (returned). Single file: the
    checkpoint is `dest` with `.safetensors` added when missing (returned) and
    its config folder is `<that path without suffix>.config/`. Existing
    outputs are replaced.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    pipe = build_tiny_pipeline(family, seed=seed)
    if not single_file:
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_saves():
            pipe.save_pretrained(str(dest), safe_serialization=True)
        log.info("wrote tiny %s diffusers folder %s", family, dest)
        return dest

    from runtime.model_ldm import pipeline_to_ldm

    if dest.suffix != ".safetensors":
        dest = dest.with_name(dest.name + ".safetensors")
    dest.parent.mkdir(parents=True, exist_ok=True)
    config_dir = single_file_config_dir(dest)
    if config_dir.exists():
        shutil.rmtree(config_dir)
    _write_config_folder(pipe, config_dir)
    save_file(pipeline_to_ldm(pipe), str(dest), metadata={"format": "pt", "sdeks": "tiny"})
    log.info("wrote tiny %s single file %s (+ %s)", family, dest, config_dir.name)
    return dest


def single_file_config_dir(checkpoint: Path) -> Path:
    """`foo.safetensors` -> `foo.config/` beside it."""
    return checkpoint.with_name(checkpoint.stem + SINGLE_FILE_CONFIG_SUFFIX)


def describe(path: Path) -> dict[str, Any]:
    """Size and layout of something `make_tiny` wrote (for the CLI to print)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    if path.is_file():
        config = single_file_config_dir(path)
        files += [p for p in config.rglob("*") if p.is_file()]
        kind = "single-file"
    else:
        kind = json.loads((path / "model_index.json").read_text())["_class_name"]
    return {"path": str(path), "layout": kind, "bytes": sum(p.stat().st_size for p in files)}
