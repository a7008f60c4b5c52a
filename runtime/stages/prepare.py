"""Stage 1, prepare inputs: check the request and resolve it into a `Plan`.

No model work happens before every field is known to be usable (diffusers'
`check_inputs`): a bad field fails here with an error naming it, and the LoRA
and VAE files are fetched first, so a missing one fails before the checkpoint
is loaded.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from runtime import (
    builtin_scripts,
    dynamic_prompts,
    embeddings,
    hires,
    refiner,
    samplers,
    seeds,
    styles,
)
from runtime.a1111 import ROUTING_SCRIPT_KEYS, GenerationRequest, Img2ImgRequest, is_no_vae
from runtime.conditioning import PROVIDERS, build_conditioning
from runtime.images import decode_image, fill_masked, resize_image
from runtime.models import Models, PipelineKind
from runtime.postprocess import POST_STAGES
from runtime.settings import RuntimeSettings
from runtime.stages.types import Plan
from sdeks.errors import InvalidParameterError, ModelNotFoundError

log = logging.getLogger(__name__)

_LORA_RE = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?(?::[^>]*)?>")


def prepare(
    request: GenerationRequest,
    img: Img2ImgRequest | None,
    *,
    options: Mapping[str, Any],
    model: str | None,
    models: Models,
    settings: RuntimeSettings,
) -> Plan:
    """The checked, resolved request. `model` is the checkpoint the dispatcher scheduled."""
    # A1111's own scripts (Refiner, Seed, Sampler) first: they set the body's fields.
    builtin_scripts.apply(request)
    check_generation(request, settings)
    named = request.requested_checkpoint()
    choice = samplers.resolve(request.sampler, request.scheduler)
    count = request.batch_size * request.n_iter
    plan = seeds.plan_seeds(request.seed, request.subseed, request.subseed_strength, count)
    init_image, mask = prepare_images(img, request, settings) if img else (None, None)
    if mask is not None and plan.subseed_strength > 0:
        raise InvalidParameterError(
            "`subseed_strength` (variation seeds) is not supported together with `mask`"
        )
    # A1111 applies the styles first; the styled prompt is what the infotext shows.
    styled, negative = styles.apply(models, request.styles, request.prompt, request.negative_prompt)
    prompt, loras = split_loras(styled)
    if request.disable_extra_networks:
        loras = []

    # The settings in force (override_settings apply to this request only).
    opts = effective_settings(options, request)
    # DESIGN.md: the model the dispatcher scheduled, the one the request names,
    # then the persisted /options value, then the pod's default.
    checkpoint = model or named or options.get("sd_model_checkpoint") or settings.default_model
    if not checkpoint:
        raise ModelNotFoundError(
            "no checkpoint named (alwayson_scripts/override_settings.sd_model_checkpoint) "
            "and the runtime has no default model (SDEKS_DEFAULT_MODEL)"
        )
    check_pinned(str(checkpoint), models, settings)
    clip_skip = clip_skip_of(opts.get("CLIP_stop_at_last_layers", 1))
    vae_name = str(opts.get("sd_vae") or "Automatic")
    if is_no_vae(vae_name):
        vae_name = "Automatic"  # one spelling downstream for "none", "None", "Use same VAE"...
    # LoRA and VAE files first: a missing one fails before the checkpoint is loaded.
    lora_files = [(name, models.fetch_lora(name), weight) for name, weight in loras]
    if not is_no_vae(vae_name):
        models.fetch_vae(vae_name)
    kind: PipelineKind = (
        "inpaint" if mask is not None else ("img2img" if init_image is not None else "txt2img")
    )
    strength = request.denoising_strength if request.denoising_strength is not None else 0.75
    result = Plan(
        request=request,
        img=img,
        opts=opts,
        checkpoint=str(checkpoint),
        kind=kind,
        choice=choice,
        plan=plan,
        prompt=prompt,
        negative_prompt=negative,
        display_prompt=styled,
        loras=lora_files,
        clip_skip=clip_skip,
        vae_name=vae_name,
        init_image=init_image,
        mask=mask,
        strength=strength,
    )
    if img is not None:
        from runtime.stages.denoise import noise_multiplier_of

        result.noise_multiplier = noise_multiplier_of(img.initial_noise_multiplier, opts)
        if result.noise_multiplier != 1.0:
            result.extra_params["Noise multiplier"] = result.noise_multiplier  # as A1111
    if not request.disable_extra_networks:
        extra_texts = [
            getattr(request, "hr_prompt", ""),
            getattr(request, "hr_negative_prompt", ""),
        ]
        result.embeddings = embeddings.used_in(models, styled, negative, *extra_texts)
    result.hires = hires.plan_hires(result, models, settings)
    if result.hires is not None:
        result.extra_params.update(hires.extra_params(result, result.hires))
    result.refiner = refiner.plan_refiner(result, models)
    if result.refiner is not None:
        result.extra_params.update(refiner.extra_params(result.refiner))
    for stage in POST_STAGES:
        stage.check(result, models, settings)
    result.conditioning = build_conditioning(result, models, settings)
    return result


def supported_alwayson_scripts() -> list[str]:
    """The `alwayson_scripts` names some stage reads (what `/sdapi/v1/scripts` lists)."""
    names = {p.script for p in PROVIDERS} | {s.script for s in POST_STAGES if s.script}
    return sorted(names | {dynamic_prompts.SCRIPT})


def check_generation(request: GenerationRequest, settings: RuntimeSettings) -> None:
    """Refuse impossible or oversized requests before any model work (diffusers' check_inputs)."""
    for name in ("width", "height"):
        value = getattr(request, name)
        if value <= 0 or value % 8:
            raise InvalidParameterError(f"`{name}` must be a positive multiple of 8, got {value}")
    if request.width * request.height > settings.max_pixels:
        raise InvalidParameterError(
            f"`width` x `height` is {request.width}x{request.height} = "
            f"{request.width * request.height} pixels, over the limit of {settings.max_pixels}"
        )
    if not 1 <= request.steps <= settings.max_steps:
        raise InvalidParameterError(
            f"`steps` must be between 1 and {settings.max_steps}, got {request.steps}"
        )
    if not 1 <= request.batch_size <= settings.max_batch_size:
        raise InvalidParameterError(
            f"`batch_size` must be between 1 and {settings.max_batch_size}, got {request.batch_size}"
        )
    if request.n_iter < 1:
        raise InvalidParameterError(f"`n_iter` must be at least 1, got {request.n_iter}")
    if request.batch_size * request.n_iter > settings.max_images:
        raise InvalidParameterError(
            f"`batch_size` x `n_iter` is {request.batch_size}x{request.n_iter}, over the limit "
            f"of {settings.max_images} images"
        )
    if not math.isfinite(request.cfg_scale) or not 0 <= request.cfg_scale <= 100:
        raise InvalidParameterError(
            f"`cfg_scale` must be between 0 and 100, got {request.cfg_scale}"
        )
    strength = request.denoising_strength
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise InvalidParameterError(f"`denoising_strength` must be between 0 and 1, got {strength}")
    claimed = set(supported_alwayson_scripts())
    scripts = request.script_alwayson
    inert = builtin_scripts.inert_scripts(scripts, claimed)
    if inert:
        # Switched off or empty: A1111 runs them as no-ops; `ignored_fields` reports them.
        log.debug("alwayson_scripts switched off or empty, ignored: %s", inert)
    unknown = sorted(
        k
        for k in scripts
        if k.lower() not in claimed
        and k.lower() not in builtin_scripts.BUILTIN
        and k not in inert
        and not dynamic_prompts.is_key(k)
    )
    if unknown:
        supported = ", ".join(sorted(claimed)) or "none"
        raise InvalidParameterError(
            f"`alwayson_scripts` {unknown}: scripts are not supported by this runtime "
            f"(supported scripts: {supported}; the routing keys "
            f"{', '.join(sorted(ROUTING_SCRIPT_KEYS))} are accepted, and any script "
            'switched off: `{}`, `{"args": []}` or `args[0]` false)'
        )


def split_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`<lora:name:weight>` tags out of the prompt: (clean prompt, [(name, weight)])."""
    loras: list[tuple[str, float]] = []
    for match in _LORA_RE.finditer(prompt):
        name, weight = match.group(1).strip(), match.group(2)
        try:
            value = float(weight) if weight is not None else 1.0
        except ValueError as exc:
            raise InvalidParameterError(
                f"`prompt` LoRA {match.group(0)!r} has a weight that is not a number"
            ) from exc
        loras.append((name, value))
    return _LORA_RE.sub("", prompt).strip(), loras


def effective_settings(
    options: Mapping[str, Any], request: GenerationRequest | None
) -> dict[str, Any]:
    """The A1111 options in force for one request: persisted options + override_settings."""
    merged = dict(options)
    if request is not None and request.override_settings:
        merged.update(request.override_settings)
    return merged


def clip_skip_of(value: Any) -> int | None:
    """A1111 `CLIP_stop_at_last_layers` (1 = last layer) -> diffusers `clip_skip` (layers skipped)."""
    try:
        layers = int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(
            f"`CLIP_stop_at_last_layers` must be an integer, got {value!r}"
        ) from exc
    if not 1 <= layers <= 12:
        raise InvalidParameterError(f"`CLIP_stop_at_last_layers` must be 1..12, got {layers}")
    return layers - 1 or None


def check_pinned(checkpoint: str, models: Models, settings: RuntimeSettings) -> None:
    """With dynamic models off, only the default checkpoint (under any A1111 name)."""
    default = settings.default_model
    if settings.dynamic_models or not default or checkpoint == default:
        return
    if models.resolve(checkpoint).key != models.resolve(default).key:
        raise InvalidParameterError(
            f"`sd_model_checkpoint` {checkpoint!r}: runtime {settings.runtime!r} serves "
            f"only its default model {default!r} (dynamic models are off)"
        )


def prepare_images(
    img: Img2ImgRequest, request: GenerationRequest, settings: RuntimeSettings
) -> tuple[Image.Image, Image.Image | None]:
    """The init image (and mask) at the request's size, masked area filled."""
    limit = settings.max_upscale_pixels
    assert img.init_images
    images = [
        decode_image(data, f"init_images[{i}]", limit) for i, data in enumerate(img.init_images)
    ]
    init = resize_image(images[0].convert("RGB"), img.resize_mode, request.width, request.height)
    if img.mask is None:
        return init, None
    mask = decode_image(img.mask, "mask", limit).convert("L")
    mask = resize_image(mask, img.resize_mode, request.width, request.height)
    if img.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = mask_blur(img)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    init = fill_masked(init, mask, img.inpainting_fill)
    return init, mask


def mask_blur(img: Img2ImgRequest) -> int:
    return img.mask_blur if img.mask_blur is not None else max(img.mask_blur_x, img.mask_blur_y)
