"""What every denoise pass shares: the step hook, the pipeline call, VAE encode/decode.

`call(pipe, kwargs, plan, ctx, batch, pass_name)` is the one place a pass calls
a diffusers pipeline: it merges each `Conditioning`'s `call_kwargs`, adds the
step hook, and tiles the VAE for large images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from PIL import Image

from runtime.control import JobControl
from runtime.stages.types import Batch, PassName, Plan, StageContext


def step_hook(control: JobControl, offset: int) -> Callable[..., dict[str, Any]]:
    """diffusers `callback_on_step_end`: progress `offset + i + 1`, stop when cancelled."""

    def on_step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        control.advance(offset + i + 1)  # raising here stops the pipeline between steps
        return kwargs

    return on_step_end


def call(
    pipe: Any,
    kwargs: dict[str, Any],
    plan: Plan,
    ctx: StageContext,
    batch: Batch,
    pass_name: PassName,
    *,
    offset: int,
    width: int,
    height: int,
) -> Any:
    """`pipe(**kwargs)` with the conditioning, the step hook and VAE tiling; `.images`."""
    import torch

    for conditioning in plan.conditioning:
        kwargs.update(conditioning.call_kwargs(batch, pass_name, width, height))
    hook = step_hook(ctx.control, offset)
    last_pass = pass_name == "hires" or plan.hires is None
    base_unet = pipe.unet  # before the refiner may replace it: put back for the next call
    try:
        if ctx.refiner_unet is not None and last_pass:
            hook = _with_refiner(hook, pipe, ctx, plan, kwargs, width, height)
        kwargs["callback_on_step_end"] = hook
        with (
            torch.inference_mode(),
            vae_tiling(pipe, width * height, ctx.settings.vae_tiling_pixels),
        ):
            return pipe(**kwargs).images
    finally:
        pipe.unet = base_unet


def _with_refiner(
    hook: Callable[..., dict[str, Any]],
    pipe: Any,
    ctx: StageContext,
    plan: Plan,
    kwargs: dict[str, Any],
    width: int,
    height: int,
) -> Callable[..., dict[str, Any]]:
    """The step hook, plus A1111's refiner switch: from step `switch` on, the refiner's UNet.

    A refiner of the base's architecture replaces `pipe.unet`; an SDXL refiner
    runs behind `RefinerUNet`, which swaps in its own conditioning as well.
    """
    from runtime import refiner

    steps = int(kwargs["num_inference_steps"])
    if "strength" in kwargs:  # img2img passes run int(steps * strength) steps
        steps = max(1, int(steps * float(kwargs["strength"])))
    switch = refiner.switch_step(plan, steps)
    unet = ctx.refiner_unet
    proxy = None
    if ctx.refiner_conditioning is not None:
        proxy = refiner.RefinerUNet(pipe.unet, unet, ctx.refiner_conditioning, width, height)
        pipe.unet = proxy  # `call` puts the base UNet back
        proxy.active = switch <= 0
    elif switch <= 0:
        pipe.unet = unet

    def on_step_end(p: Any, i: int, t: Any, step_kwargs: dict[str, Any]) -> dict[str, Any]:
        out = hook(p, i, t, step_kwargs)
        if i + 1 >= switch:
            if proxy is not None:
                proxy.active = True
            else:
                p.unet = unet
        return out

    return on_step_end


@contextmanager
def vae_tiling(pipe: Any, pixels: int, limit: int) -> Any:
    tile = pixels > limit
    if tile and hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
        try:
            yield
        finally:
            pipe.vae.disable_tiling()
    else:
        yield


def encode_latents(pipe: Any, images: list[Image.Image] | Image.Image, device: str) -> Any:
    """Images -> scaled VAE latents (the distribution's mean: no RNG spent on it)."""
    import torch

    vae = pipe.vae
    dtype = vae.dtype
    # SDXL's VAE overflows in fp16 (`force_upcast`); diffusers' own encode/decode
    # upcast it for the call and cast it back, and so do we.
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    pixels = pipe.image_processor.preprocess(images).to(device)
    with torch.inference_mode():
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            moments = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        finally:
            if upcast:
                vae.to(dtype=dtype)
        latents = (moments * vae.config.scaling_factor).to(dtype)
    return latents


def decode_latents(pipe: Any, latents: Any, pixels_limit: int) -> list[Image.Image]:
    """Scaled latents -> PIL images, as the pipelines' own `output_type="pil"` decodes."""
    import torch

    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    height = latents.shape[-2] * pipe.vae_scale_factor
    width = latents.shape[-1] * pipe.vae_scale_factor
    with torch.inference_mode(), vae_tiling(pipe, width * height, pixels_limit):
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            scaled = latents.to(vae.dtype) / vae.config.scaling_factor
            decoded = vae.decode(scaled, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=dtype)
    images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
    return images


def inject_noise(pipe: Any, noise: Any) -> None:
    """Make this job's img2img pipeline add *our* seeded noise to the init latents.

    diffusers' img2img `prepare_latents` draws its noise from the generators,
    which cannot express A1111 variation seeds (a slerp of two seeds' noise).
    The image arrives already encoded (4 channels), so noising is all that is
    left: `add_noise(init_latents, noise, t)`. The pipeline is this job's own
    `from_pipe` copy, so the override never touches another job.
    """

    def prepare_latents(
        image: Any,
        timestep: Any,
        batch_size: int,
        num_images_per_prompt: int,
        dtype: Any,
        device: Any,
        generator: Any = None,
        *_: Any,
        **__: Any,
    ) -> Any:
        init = image.to(device=device, dtype=dtype)
        return pipe.scheduler.add_noise(init, noise.to(device=device, dtype=dtype), timestep)

    pipe.prepare_latents = prepare_latents


#: A1111's range of `initial_noise_multiplier` (its option's slider).
NOISE_MULTIPLIER_RANGE = (0.0, 1.5)


def noise_multiplier_of(value: Any, opts: Mapping[str, Any]) -> float:
    """A1111's img2img `initial_noise_multiplier`: the body's value, else the option
    (default 1.0); a number within `NOISE_MULTIPLIER_RANGE`, else `invalid_parameter`."""
    from sdeks.errors import InvalidParameterError

    name = "initial_noise_multiplier"
    if value is None:
        value = opts.get(name, 1.0)
        name = "override_settings.initial_noise_multiplier"
    low, high = NOISE_MULTIPLIER_RANGE
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise InvalidParameterError(f"`{name}` must be between {low} and {high}, got {value!r:.40}")
    return float(value)


@contextmanager
def scaled_initial_noise(pipe: Any, multiplier: float) -> Iterator[None]:
    """During the block, `pipe` (an inpaint pipeline) starts from its noise x `multiplier`.

    A1111's img2img multiplies the sampler's initial noise by
    `initial_noise_multiplier` before noising the init latents. diffusers' inpaint
    pipelines noise them with `scheduler.add_noise(latents, noise, t)` (linear in
    `noise` for every scheduler, so this is scheduler-agnostic) and, at strength 1,
    start from `noise * init_noise_sigma` without `add_noise`; the same (scaled)
    noise re-noises the kept region at each step of a 4-channel UNet. The pipeline
    is the job's own object and both overrides are removed when the block ends, so
    nothing else, and no later call, sees them.
    """
    if multiplier == 1.0:
        yield
        return
    scheduler = pipe.scheduler
    add_noise = scheduler.add_noise
    had_prepare = "prepare_latents" in vars(pipe)
    prepare = pipe.prepare_latents

    def scaled_add_noise(original: Any, noise: Any, timesteps: Any) -> Any:
        return add_noise(original, noise * multiplier, timesteps)

    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        out = prepare(*args, **kwargs)
        if kwargs.get("is_strength_max", True):  # pure noise: no `add_noise` was called
            out = (out[0] * multiplier, *out[1:])
        return out

    scheduler.add_noise = scaled_add_noise
    pipe.prepare_latents = prepare_latents
    try:
        yield
    finally:
        del scheduler.add_noise
        if had_prepare:
            pipe.prepare_latents = prepare
        else:
            del pipe.prepare_latents
