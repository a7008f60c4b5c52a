"""Stage 4, the hires pass: A1111's "hires fix" (txt2img `enable_hr`).

    first pass at width x height -> upscale -> img2img at the target size

as A1111's `StableDiffusionProcessingTxt2Img.sample_hr_pass` does it:

- the target size is `hr_scale` x the first pass, or `hr_resize_x`/`hr_resize_y`
  (one of them 0: the other from the aspect ratio; both: scaled to cover, then
  cropped to exactly that size);
- a latent upscaler ("Latent", "Latent (bicubic)", ...) interpolates the first
  pass's latents; an image upscaler (`runtime.upscalers`) upscales the decoded
  images, which are encoded again;
- the second pass runs `hr_second_pass_steps` (0: `steps`) at
  `denoising_strength` (A1111 runs `int(steps x strength)` of them), with
  `hr_sampler_name`/`hr_scheduler`, `hr_prompt`/`hr_negative_prompt` and
  `hr_checkpoint_name` when given (None, "", "None" and "Use same ..." mean
  the first pass's: `runtime.values.is_unset`), from each image's own seed;
- a target equal to the first pass's size turns the hires fix off, as in A1111.

The infotext gains A1111's fields (`Denoising strength`, `Hires upscale` or
`Hires resize`, `Hires steps`, `Hires upscaler`, `Hires checkpoint`,
`Hires sampler`, `Hires schedule type`, `Hires prompt`, `Hires negative prompt`);
`Size` stays the first pass's, as in A1111.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from runtime import prompts, samplers, seeds, styles, upscalers
from runtime.a1111 import Txt2ImgRequest, is_no_vae
from runtime.settings import RuntimeSettings
from runtime.stages import denoise, first_pass
from runtime.stages.types import Batch, Plan, StageContext
from runtime.values import is_unset
from sdeks.errors import InvalidParameterError

#: A1111's `shared.latent_upscale_modes`: name -> (torch interpolate mode, antialias).
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
#: `hr_upscaler` absent: A1111's default `latent_upscale_default_mode`.
DEFAULT_UPSCALER = "Latent"
_OPT_F = 8  # latent downscale factor


@dataclass(frozen=True)
class HiresPlan:
    """What the hires pass does, resolved in stage 1."""

    upscaler: str
    #: (mode, antialias) for a latent upscaler, None for an image upscaler.
    latent_mode: tuple[str, bool] | None
    #: Size the first pass is upscaled to, before the crop of `hr_resize_x` x `hr_resize_y`.
    upscale_to: tuple[int, int]
    #: Latent rows/columns cut to reach the exact `hr_resize` size.
    truncate: tuple[int, int]
    steps: int
    strength: float
    choice: samplers.SamplerChoice | None
    checkpoint: str | None
    prompt: str | None
    negative_prompt: str | None

    @property
    def steps_run(self) -> int:
        """Steps the second pass actually denoises (A1111: `int(steps * strength)`)."""
        if self.strength == 0:
            return 0
        return max(1, int(self.steps * self.strength))


def plan_hires(plan: Plan, models: Any, settings: RuntimeSettings) -> HiresPlan | None:
    """Stage 1's part: check the hires fields and resolve them (None: no hires pass)."""
    request = plan.request
    if not isinstance(request, Txt2ImgRequest) or not request.enable_hr:
        return None
    width, height = request.width, request.height
    if request.hr_resize_x == 0 and request.hr_resize_y == 0:
        scale = request.hr_scale
        if not math.isfinite(scale) or scale <= 0:
            raise InvalidParameterError(f"`hr_scale` must be a positive number, got {scale}")
        upscale_to = (int(width * scale), int(height * scale))
        truncate = (0, 0)
    else:
        rx, ry = request.hr_resize_x, request.hr_resize_y
        if rx < 0 or ry < 0:
            raise InvalidParameterError(
                f"`hr_resize_x`/`hr_resize_y` must not be negative, got {rx}x{ry}"
            )
        if ry == 0:
            upscale_to, truncate = (rx, rx * height // width), (0, 0)
        elif rx == 0:
            upscale_to, truncate = (ry * width // height, ry), (0, 0)
        else:
            if width / height < rx / ry:
                upscale_to = (rx, rx * height // width)
            else:
                upscale_to = (ry * width // height, ry)
            truncate = ((upscale_to[0] - rx) // _OPT_F, (upscale_to[1] - ry) // _OPT_F)
    if upscale_to == (width, height):
        return None  # A1111: "the user has chosen to do nothing"
    if min(upscale_to) < _OPT_F:
        raise InvalidParameterError(
            f"hires fix target {upscale_to[0]}x{upscale_to[1]} is smaller than {_OPT_F} pixels"
        )
    pixels = upscale_to[0] * upscale_to[1]
    if pixels > settings.max_pixels:
        raise InvalidParameterError(
            f"hires fix target {upscale_to[0]}x{upscale_to[1]} (`hr_scale` {request.hr_scale:g}, "
            f"`hr_resize_x`/`hr_resize_y` {request.hr_resize_x}x{request.hr_resize_y}) is "
            f"{pixels} pixels, over the limit of {settings.max_pixels}"
        )
    steps = request.hr_second_pass_steps
    if not 0 <= steps <= settings.max_steps:
        raise InvalidParameterError(
            f"`hr_second_pass_steps` must be between 0 and {settings.max_steps}, got {steps}"
        )
    upscaler = request.hr_upscaler or DEFAULT_UPSCALER
    latent_mode = LATENT_UPSCALE_MODES.get(upscaler)
    if latent_mode is None and upscaler not in upscalers.available(models):
        names = [*LATENT_UPSCALE_MODES, *upscalers.available(models)]
        raise InvalidParameterError(
            f"`hr_upscaler` {upscaler!r} is not installed; available: {', '.join(names)}"
        )
    sampler_name = request.hr_sampler_name
    scheduler = request.hr_scheduler
    choice = None
    same_sampler, same_scheduler = is_unset(sampler_name), is_unset(scheduler)
    if not same_sampler or not same_scheduler:
        try:
            choice = samplers.resolve(
                request.sampler if same_sampler else sampler_name,
                request.scheduler if same_scheduler else scheduler,
            )
        except InvalidParameterError as exc:
            raise InvalidParameterError(
                exc.message.replace("`sampler_name`", "`hr_sampler_name`").replace(
                    "`scheduler`", "`hr_scheduler`"
                )
            ) from exc
    checkpoint = request.hr_checkpoint_name
    if is_unset(checkpoint):
        checkpoint = None
    elif checkpoint is not None:
        if models.resolve(checkpoint).key == models.resolve(plan.checkpoint).key:
            checkpoint = None
        elif plan.loras:
            raise InvalidParameterError(
                f"`hr_checkpoint_name` {checkpoint!r}: prompt LoRAs are not supported with a "
                "different hires checkpoint"
            )
    strength = request.denoising_strength
    strength = 0.75 if strength is None else strength
    hr_prompt = hr_negative = None
    if request.hr_prompt or request.hr_negative_prompt:
        # A1111 applies the styles to the hires prompts too.
        styled = styles.apply(
            models,
            request.styles,
            request.hr_prompt or request.prompt,
            request.hr_negative_prompt or request.negative_prompt,
        )
        hr_prompt = styled[0] if request.hr_prompt else None
        hr_negative = styled[1] if request.hr_negative_prompt else None
    return HiresPlan(
        upscaler=upscaler,
        latent_mode=latent_mode,
        upscale_to=upscale_to,
        truncate=truncate,
        steps=steps or request.steps,
        strength=strength,
        choice=choice,
        checkpoint=checkpoint,
        prompt=hr_prompt,
        negative_prompt=hr_negative,
    )


def extra_params(plan: Plan, hires: HiresPlan) -> dict[str, Any]:
    """A1111's infotext fields of the hires fix, in A1111's order."""
    request = plan.request
    assert isinstance(request, Txt2ImgRequest)
    params: dict[str, Any] = {"Denoising strength": hires.strength}
    if hires.checkpoint is not None:
        params["Hires checkpoint"] = hires.checkpoint
    if hires.choice is not None and hires.choice.sampler.name != plan.choice.sampler.name:
        params["Hires sampler"] = hires.choice.sampler.name
    if hires.choice is not None and hires.choice.schedule_label != plan.choice.schedule_label:
        params["Hires schedule type"] = hires.choice.schedule_label
    if hires.prompt is not None and hires.prompt != plan.display_prompt:
        params["Hires prompt"] = hires.prompt
    if hires.negative_prompt is not None and hires.negative_prompt != plan.negative_prompt:
        params["Hires negative prompt"] = hires.negative_prompt
    if request.hr_resize_x == 0 and request.hr_resize_y == 0:
        params["Hires upscale"] = request.hr_scale
    else:
        params["Hires resize"] = f"{request.hr_resize_x}x{request.hr_resize_y}"
    if request.hr_second_pass_steps:
        params["Hires steps"] = request.hr_second_pass_steps
    params["Hires upscaler"] = hires.upscaler
    return params


def enabled(plan: Plan) -> bool:
    return plan.hires is not None


def steps(plan: Plan) -> int:
    return plan.hires.steps_run if plan.hires is not None else 0


def first_pass_output(plan: Plan) -> str:
    """What the first pass should leave: latents for a latent upscaler, else images."""
    assert plan.hires is not None
    return "latent" if plan.hires.latent_mode is not None else "pil"


def run(
    plan: Plan, ctx: StageContext, batch: Batch, embeds: dict[str, Any], *, output_type: str
) -> Batch:
    """Upscale `batch` and denoise it again at the target size."""
    import torch

    hires = plan.hires
    assert hires is not None
    control = ctx.control
    target_w, target_h = hires.upscale_to
    control.check()
    with ExitStack() as stack:
        pipe, embeds = _hires_pipeline(plan, ctx, stack, embeds)
        # 1. Upscale to the target size, as latents.
        if hires.latent_mode is not None:
            mode, antialias = hires.latent_mode
            latents = torch.nn.functional.interpolate(
                batch.latents.float(),
                size=(target_h // _OPT_F, target_w // _OPT_F),
                mode=mode,
                antialias=antialias,
            ).to(batch.latents.dtype)
        else:
            assert batch.images is not None
            images = [
                upscalers.upscale_image(
                    ctx.models,
                    image,
                    hires.upscaler,
                    target_w,
                    target_h,
                    check=control.check,  # between tiles: cancel and the time limit
                    field_name="hr_upscaler",
                )
                for image in batch.images
            ]
            latents = denoise.encode_latents(pipe, images, ctx.device)
        # 2. Crop to the exact `hr_resize_x` x `hr_resize_y` (A1111's truncate_x/y).
        tx, ty = hires.truncate
        latents = latents[
            :,
            :,
            ty // 2 : latents.shape[2] - (ty + 1) // 2,
            tx // 2 : latents.shape[3] - (tx + 1) // 2,
        ]
        height, width = latents.shape[2] * _OPT_F, latents.shape[3] * _OPT_F
        if hires.steps_run == 0:
            # Denoising strength 0: the upscale is the result.
            out = Batch(index=batch.index, indices=batch.indices, latents=latents)
            if output_type != "latent":
                out.images = denoise.decode_latents(pipe, latents, ctx.settings.vae_tiling_pixels)
            return out
        # 3. Each image's own seed, at the target size (A1111 makes a fresh ImageRNG).
        seed_plan = plan.plan
        noise = torch.stack(
            [
                seeds.image_noise(
                    seed_plan.all_seeds[i],
                    seed_plan.all_subseeds[i],
                    seed_plan.subseed_strength,
                    tuple(latents.shape[1:]),
                )
                for i in batch.indices
            ]
        )
        denoise.inject_noise(pipe, noise)
        batch_seeds = [seed_plan.all_seeds[i] for i in batch.indices]
        choice = hires.choice or plan.choice
        if choice.sampler.brownian:
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, noise_sampler_seed=batch_seeds
            )
        request = plan.request
        kwargs: dict[str, Any] = {
            **embeds,
            "image": latents.to(ctx.device),
            "strength": hires.strength,
            "num_inference_steps": hires.steps,
            "guidance_scale": request.cfg_scale,
            "generator": [seeds.generator(s) for s in batch_seeds],
            "output_type": output_type,
        }
        if int(hires.steps * hires.strength) < 1:
            # A1111 runs int(steps * strength) steps; diffusers needs at least one.
            kwargs["num_inference_steps"] = math.ceil(1 / hires.strength)
        if request.eta is not None:
            kwargs["eta"] = request.eta
        out_images = denoise.call(
            pipe,
            kwargs,
            plan,
            ctx,
            batch,
            "hires",
            offset=first_pass.steps(plan),
            width=width,
            height=height,
        )
    result = Batch(index=batch.index, indices=batch.indices)
    if output_type == "latent":
        result.latents = out_images
    else:
        result.images = list(out_images)
    return result


def _hires_pipeline(
    plan: Plan, ctx: StageContext, stack: ExitStack, embeds: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The img2img pipeline of the second pass (sharing the weights) and its prompt embeds."""
    from runtime.families import derive, diffusers_attr

    hires = plan.hires
    assert hires is not None
    source = ctx.pipe
    family = ctx.family
    same_weights = hires.checkpoint is None
    if not same_weights:
        assert hires.checkpoint is not None
        lease = stack.enter_context(ctx.models.use(hires.checkpoint, "img2img"))
        source, family = lease.pipeline, lease.family
        source.vae = ctx.pipe.vae if not is_no_vae(plan.vae_name) else source.vae
    pipe = derive(source, family, "img2img")
    choice = hires.choice or plan.choice
    if hires.choice is not None or not same_weights:
        scheduler_cls = diffusers_attr(choice.scheduler_class)
        # The same weights' pipeline carries the render's sampler options: start from the
        # checkpoint's own config, as another checkpoint's pipeline does.
        config = pipe.scheduler.config
        if same_weights and ctx.base_scheduler_config is not None:
            config = ctx.base_scheduler_config
        pipe.scheduler = scheduler_cls.from_config(config, **choice.scheduler_kwargs)
    for conditioning in plan.conditioning:
        pipe = conditioning.pipeline(pipe, ctx)
    request = plan.request
    prompt = hires.prompt if hires.prompt is not None else plan.display_prompt
    negative = hires.negative_prompt if hires.negative_prompt is not None else plan.negative_prompt
    if same_weights and prompt == plan.display_prompt and negative == plan.negative_prompt:
        return pipe, embeds
    from runtime import embeddings
    from runtime.stages.prepare import split_loras

    clean, _ = split_loras(prompt)
    clean, negative = embeddings.convert(pipe, clean), embeddings.convert(pipe, negative)
    return pipe, prompts.encode(pipe, clean, negative, plan.clip_skip, request.batch_size)
