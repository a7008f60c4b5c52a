"""Stage 7, encode: the images' infotexts and A1111's `info`, as the `RenderResult`.

Infotext fields follow A1111's `create_infotext` order; features add theirs
through `Plan.extra_params` (A1111's `extra_generation_params`), placed where
A1111 places them: after the core fields, before `Version`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from PIL import Image

from runtime import infotext
from runtime.a1111 import GenerationRequest, is_no_vae
from runtime.stages.prepare import mask_blur
from runtime.stages.types import Loaded, Plan, RenderResult

VERSION = "sdeks-runtime"


def result(
    plan: Plan, loaded: Loaded, images: list[Image.Image], lora_note: str | None
) -> RenderResult:
    texts = [infotext_of(plan, loaded, i, lora_note) for i in range(len(images))]
    return RenderResult(
        images=images,
        infotexts=texts,
        info=info_of(plan, loaded, texts),
        parameters=parameters_of(plan.request),
        seeds=plan.plan.all_seeds[: len(images)],
        model=loaded.title,
        model_load_ms=loaded.load_ms,
    )


def infotext_of(plan: Plan, loaded: Loaded, i: int, lora_note: str | None) -> str:
    request, img, seed_plan = plan.request, plan.img, plan.plan
    varies = seed_plan.subseed_strength > 0
    vae_name, clip_skip = plan.vae_name, plan.clip_skip
    params: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": plan.choice.sampler.name,
        "Schedule type": plan.choice.schedule_label,
        "CFG scale": request.cfg_scale,
        "Seed": seed_plan.all_seeds[i],
        "Size": f"{request.width}x{request.height}",
        "Model hash": loaded.hash,
        "Model": loaded.model_name,
        "VAE": None if is_no_vae(vae_name) else vae_name,
        "Variation seed": seed_plan.all_subseeds[i] if varies else None,
        "Variation seed strength": seed_plan.subseed_strength if varies else None,
        "Denoising strength": plan.strength
        if img is not None
        else plan.extra_params.get("Denoising strength"),
        "Mask blur": mask_blur(img) if img is not None and img.mask else None,
        "Clip skip": clip_skip + 1 if clip_skip else None,
        "Lora hashes": f'"{lora_note}"' if lora_note else None,
        "Tiling": "True" if request.tiling else None,
        **plan.extra_params,
        "Version": VERSION,
    }
    return infotext.format_infotext(plan.display_prompt, plan.negative_prompt, params)


def info_of(plan: Plan, loaded: Loaded, infotexts: list[str]) -> dict[str, Any]:
    request, img, seed_plan = plan.request, plan.img, plan.plan
    count = len(infotexts)
    strength = request.denoising_strength
    if img is not None and strength is None:
        strength = 0.75
    if plan.hires is not None:
        strength = plan.hires.strength
    vae_name, clip_skip = plan.vae_name, plan.clip_skip
    return {
        "prompt": plan.display_prompt,
        "all_prompts": [plan.display_prompt] * count,
        "negative_prompt": plan.negative_prompt,
        "all_negative_prompts": [plan.negative_prompt] * count,
        "seed": seed_plan.seed,
        "all_seeds": seed_plan.all_seeds[:count],
        "subseed": seed_plan.subseed,
        "all_subseeds": seed_plan.all_subseeds[:count],
        "subseed_strength": seed_plan.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": plan.choice.sampler.name,
        "scheduler": plan.choice.schedule_label,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "restore_faces": bool(request.restore_faces),
        "face_restoration_model": plan.extra_params.get("Face restoration"),
        "sd_model_name": loaded.model_name,
        "sd_model_hash": loaded.hash,
        "sd_vae_name": None if is_no_vae(vae_name) else vae_name,
        "sd_vae_hash": None,
        "seed_resize_from_w": request.seed_resize_from_w,
        "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": strength if strength is not None else 0,
        "extra_generation_params": dict(plan.extra_params),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": request.styles or [],
        "job_timestamp": datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        "clip_skip": (clip_skip or 0) + 1,
        "is_using_inpainting_conditioning": bool(img is not None and img.mask)
        and loaded.inpainting_unet,
        "version": VERSION,
    }


def parameters_of(request: GenerationRequest) -> dict[str, Any]:
    """The request as A1111 echoes it, without the (large) images."""
    return request.model_dump(exclude={"init_images", "mask"})
