"""Stage 3, the first pass: denoise one `n_iter` batch at the request's size.

txt2img starts from this batch's seeded noise; img2img from the encoded init
image noised with it; inpainting hands image and mask to the inpaint
pipeline. `output_type="latent"` leaves the batch as latents for a pass that
follows (hires fix, refiner), else the pipeline decodes it to images.
"""

from __future__ import annotations

import math
from typing import Any

from runtime import seeds
from runtime.stages import denoise
from runtime.stages.types import Batch, Plan, StageContext


def steps(plan: Plan) -> int:
    """Denoising steps the first pass runs (img2img: A1111's `int(steps * strength)`)."""
    request = plan.request
    if plan.img is None:
        return request.steps
    return max(1, int(request.steps * plan.strength))


def run(
    plan: Plan, ctx: StageContext, n: int, embeds: dict[str, Any], *, output_type: str = "pil"
) -> Batch:
    """Batch `n` of the request after the first pass."""
    import torch

    request, pipe = plan.request, ctx.pipe
    batch_size = request.batch_size
    idx = range(n * batch_size, (n + 1) * batch_size)
    batch = Batch(index=n, indices=idx)
    init_image, mask, strength = plan.init_image, plan.mask, plan.strength
    if init_image is not None and strength == 0:
        # Nothing to denoise (diffusers refuses zero steps): the init image is the result.
        batch.images = [init_image.copy() for _ in idx]
        return batch

    all_seeds = plan.plan.all_seeds
    batch_seeds = [all_seeds[i] for i in idx]
    if plan.choice.sampler.brownian:
        # DPMSolverSDEScheduler draws Brownian noise from its own seed(s), one tree per image.
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, noise_sampler_seed=batch_seeds
        )
    latent_shape = (
        pipe.vae.config.latent_channels,  # 4; an inpainting UNet takes 9 but denoises 4
        request.height // pipe.vae_scale_factor,
        request.width // pipe.vae_scale_factor,
    )
    noise = torch.stack(
        [
            seeds.image_noise(
                all_seeds[i], plan.plan.all_subseeds[i], plan.plan.subseed_strength, latent_shape
            )
            for i in idx
        ]
    )
    kwargs: dict[str, Any] = {
        **embeds,
        "num_inference_steps": request.steps,
        "guidance_scale": request.cfg_scale,
        "generator": [seeds.generator(s) for s in batch_seeds],
        "output_type": output_type,
    }
    if request.eta is not None:
        kwargs["eta"] = request.eta
    if init_image is not None and int(request.steps * strength) < 1:
        # A1111 runs int(steps * strength) steps; diffusers needs at least one.
        kwargs["num_inference_steps"] = math.ceil(1 / strength)
    if mask is not None:
        img = plan.img
        assert img is not None
        kwargs.update(image=init_image, mask_image=mask, strength=strength)
        kwargs.update(height=request.height, width=request.width)
        if img.inpaint_full_res:
            # A1111 "only masked": inpaint the mask's bounding box (plus padding)
            # at full resolution and paste it back; diffusers' padding_mask_crop.
            kwargs["padding_mask_crop"] = img.inpaint_full_res_padding
    elif init_image is not None:
        latents = denoise.encode_latents(pipe, init_image, ctx.device)
        kwargs.update(image=latents.repeat(batch_size, 1, 1, 1), strength=strength)
        # A1111's `initial_noise_multiplier`: the noise the init latents get, scaled.
        denoise.inject_noise(pipe, noise * plan.noise_multiplier)
    else:
        kwargs.update(
            height=request.height,
            width=request.width,
            latents=noise.to(ctx.device, pipe.unet.dtype),
        )
    multiplier = plan.noise_multiplier if mask is not None else 1.0  # img2img: in `noise`
    with denoise.scaled_initial_noise(pipe, multiplier):
        out = denoise.call(
            pipe,
            kwargs,
            plan,
            ctx,
            batch,
            "first",
            offset=0,
            width=request.width,
            height=request.height,
        )
    if output_type == "latent":
        batch.latents = out
    else:
        batch.images = list(out)
    return batch
