"""Stage 5, the refiner (`refiner_checkpoint`, `refiner_switch_at`), with A1111's meaning.

A1111 switches the model in the middle of sampling: once the completed share
of the steps reaches `refiner_switch_at`, the remaining steps of the same
sampler run on the refiner checkpoint's UNet (`apply_refiner`). Here the
job's pipeline hands the UNet calls to the refiner's UNet from the step hook,
so the scheduler, its state and the latents carry on untouched. The switch
happens in the last pass: the hires pass when there is one (A1111's default
`hires_fix_refiner_pass` "second pass"), else the first.

`refiner_checkpoint` None, "", "None" or "Use same checkpoint" means no
refiner (`runtime.values.is_unset`). `refiner_switch_at` absent means the
refiner from the first step, as in A1111; 1 or more means never. The infotext
gains `Refiner: <name>` and `Refiner switch at: <fraction>`.

Two kinds of refiner:

- A checkpoint of the base model's architecture (an SD 1.x refiner for an SD
  1.x base, an SDXL base checkpoint for an SDXL base): its UNet takes the
  base's conditioning as it is.
- The SDXL refiner architecture (stabilityai's `sd_xl_refiner_1.0`, detected
  by `runtime.families`): only the OpenCLIP text encoder, cross-attention as
  wide as it (1280), time ids with an aesthetic score instead of the target
  size. As A1111 recomputes the conds for the refiner model, the refiner gets
  its own: the prompts encoded by its text encoder (penultimate layer, pooled
  output as `text_embeds`, A1111's emphasis and chunks, `clip_skip`) once per
  render when it is attached, and time ids `(height, width, 0, 0, score)` with
  A1111's scores, the options `sdxl_refiner_high_aesthetic_score` (6.0) for
  the prompt and `sdxl_refiner_low_aesthetic_score` (2.5) for the negative
  prompt (`/sdapi/v1/options` or `override_settings`); an empty negative
  prompt's conds are zeros, as A1111 makes them for every SDXL model. `RefinerUNet` stands in for the
  pipeline's UNet during the last pass: the base UNet with the pipeline's
  conditioning before the switch, the refiner's UNet with its own after it
  (also from the very first step, where diffusers' time-id check would refuse
  the refiner's UNet). It refines SDXL bases only: an SD 1.x/2.x base, or an
  inpainting base, is refused naming `refiner_checkpoint`. ControlNet
  residuals are not passed to it (they are sized for the base UNet), as
  A1111's ControlNet does not drive the refiner; textual-inversion embeddings
  live in the base's text encoders, so their names reach the refiner's encoder
  as plain words. The base's VAE decodes (the SDXL base and refiner ship the
  same VAE).

A refiner checkpoint is not a base model: `sd_model_checkpoint` naming an
SDXL refiner is refused (`check_base`), naming the field.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from runtime.stages.types import Batch, Plan, StageContext
from runtime.values import is_unset
from sdeks.errors import InvalidParameterError

#: A1111's `sdxl_refiner_high_aesthetic_score` / `sdxl_refiner_low_aesthetic_score`
#: (diffusers' `aesthetic_score` / `negative_aesthetic_score` defaults).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class RefinerPlan:
    checkpoint: str
    switch_at: float
    #: For an SDXL refiner: A1111's `sdxl_refiner_high/low_aesthetic_score` options.
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE


@dataclass
class RefinerConditioning:
    """The SDXL refiner's own conds for one render (`batch` rows each)."""

    prompt_embeds: Any
    negative_prompt_embeds: Any
    pooled: Any
    negative_pooled: Any
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    def time_ids(self, width: int, height: int, score: float) -> list[float]:
        """original_size + crops_coords_top_left + aesthetic_score, as diffusers' refiner."""
        return [float(height), float(width), 0.0, 0.0, score]

    def rows(
        self, n: int, width: int, height: int, device: Any, dtype: Any
    ) -> tuple[Any, Any, Any]:
        """(encoder_hidden_states, text_embeds, time_ids) for `n` UNet input rows: the
        batch with classifier-free guidance ([negative..., positive...], as diffusers
        concatenates them) or without (positive only)."""
        import torch

        batch = int(self.prompt_embeds.shape[0])
        pos_ids = torch.tensor([self.time_ids(width, height, self.aesthetic_score)] * batch)
        neg_ids = torch.tensor(
            [self.time_ids(width, height, self.negative_aesthetic_score)] * batch
        )
        if n == 2 * batch:
            hidden = torch.cat([self.negative_prompt_embeds, self.prompt_embeds])
            pooled = torch.cat([self.negative_pooled, self.pooled])
            ids = torch.cat([neg_ids, pos_ids])
        elif n == batch:
            hidden, pooled, ids = self.prompt_embeds, self.pooled, pos_ids
        else:
            raise RuntimeError(f"refiner conditioning has {batch} rows, the UNet got {n}")
        return (
            hidden.to(device=device, dtype=dtype),
            pooled.to(device=device, dtype=dtype),
            ids.to(device=device, dtype=dtype),
        )


#: UNet keyword arguments that belong to the base UNet (ControlNet residuals).
_BASE_ONLY = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


class RefinerUNet:
    """The pipeline's UNet for the last pass with an SDXL-refiner-architecture refiner.

    Until `active`, calls go to the base UNet as they come; from then on to the
    refiner's UNet with the refiner's own conditioning in place of the
    pipeline's. Attribute reads (`config`, `dtype`, `add_embedding`...) are the
    base UNet's, so the pipeline's own checks and set-up see the model it was
    built for.
    """

    #: Set by the step hook once the switch step is reached.
    active: bool

    def __init__(
        self, base: Any, refiner: Any, conditioning: RefinerConditioning, width: int, height: int
    ) -> None:
        self.__dict__.update(
            _base=base,
            _refiner=refiner,
            _conditioning=conditioning,
            _size=(width, height),
            active=False,
        )

    def __getattr__(self, name: str) -> Any:
        try:
            base = self.__dict__["_base"]
        except KeyError:  # not built yet (copy, pickle): no attribute to delegate
            raise AttributeError(name) from None
        return getattr(base, name)

    def __call__(self, sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self._base(sample, timestep, *args, **kwargs)
        if kwargs.pop("encoder_hidden_states", None) is None:
            args = args[1:]  # passed by position
        for name in _BASE_ONLY:
            kwargs.pop(name, None)
        width, height = self._size
        hidden, text_embeds, time_ids = self._conditioning.rows(
            int(sample.shape[0]), width, height, sample.device, sample.dtype
        )
        added = dict(kwargs.pop("added_cond_kwargs", None) or {})
        added.update(text_embeds=text_embeds, time_ids=time_ids)
        return self._refiner(sample, timestep, hidden, *args, added_cond_kwargs=added, **kwargs)


def plan_refiner(plan: Plan, models: Any) -> RefinerPlan | None:
    """Stage 1's part: check `refiner_checkpoint`/`refiner_switch_at` (None: no refiner)."""
    request = plan.request
    name = request.refiner_checkpoint
    if is_unset(name):
        return None
    assert name is not None
    switch = request.refiner_switch_at
    if switch is not None and not (math.isfinite(switch) and switch >= 0):
        raise InvalidParameterError(
            f"`refiner_switch_at` must be a fraction between 0 and 1, got {switch}"
        )
    if switch is not None and switch >= 1:
        return None  # A1111: never reached
    entry = models.resolve(name)  # unknown: ModelNotFoundError naming it
    if entry.key == models.resolve(plan.checkpoint).key:
        return None  # A1111: the refiner is the model already loaded
    from runtime.options import aesthetic_score

    scores = {
        key: aesthetic_score(key, plan.opts[key]) if key in plan.opts else default
        for key, default in (
            ("sdxl_refiner_high_aesthetic_score", AESTHETIC_SCORE),
            ("sdxl_refiner_low_aesthetic_score", NEGATIVE_AESTHETIC_SCORE),
        )
    }
    return RefinerPlan(
        checkpoint=name,
        switch_at=float(switch or 0.0),
        aesthetic_score=scores["sdxl_refiner_high_aesthetic_score"],
        negative_aesthetic_score=scores["sdxl_refiner_low_aesthetic_score"],
    )


def extra_params(refiner: RefinerPlan) -> dict[str, Any]:
    return {"Refiner": refiner.checkpoint, "Refiner switch at": refiner.switch_at}


def enabled(plan: Plan) -> bool:
    return plan.refiner is not None


def steps(plan: Plan) -> int:
    return 0  # the refiner runs the last steps of a pass; they are counted there


def check_base(plan: Plan, family: Any) -> None:
    """An SDXL refiner is no base model: refuse it as the render's checkpoint."""
    if family is not None and getattr(family, "refiner", False):
        raise InvalidParameterError(
            f"`sd_model_checkpoint` {plan.checkpoint!r} is an SDXL refiner; it cannot render "
            "on its own: choose an SDXL base checkpoint and name the refiner in "
            "`refiner_checkpoint`"
        )


def attach(plan: Plan, ctx: StageContext, stack: ExitStack) -> None:
    """Lease the refiner for the render and give the step hook its UNet (stage 2)."""
    refiner = plan.refiner
    assert refiner is not None
    lease = stack.enter_context(ctx.models.use(refiner.checkpoint, "txt2img"))
    unet = lease.pipeline.unet
    base = ctx.pipe.unet
    base = getattr(base, "_orig_mod", base)
    if getattr(lease.family, "refiner", False):
        ctx.refiner_conditioning = _xl_refiner_conditioning(plan, ctx, lease.pipeline, base)
    elif unet.config.cross_attention_dim != base.config.cross_attention_dim or (
        unet.config.in_channels != base.config.in_channels
    ):
        raise InvalidParameterError(
            f"`refiner_checkpoint` {refiner.checkpoint!r} has another architecture than "
            f"{plan.checkpoint!r} (cross-attention {unet.config.cross_attention_dim} vs "
            f"{base.config.cross_attention_dim}); a refiner must share the base model's "
            "architecture or be an SDXL refiner for an SDXL base"
        )
    ctx.refiner_unet = unet


def _xl_refiner_conditioning(
    plan: Plan, ctx: StageContext, pipe: Any, base_unet: Any
) -> RefinerConditioning:
    """Check an SDXL refiner fits the base, and encode the prompts with its text encoder."""
    from runtime import prompts

    assert plan.refiner is not None
    name = plan.refiner.checkpoint
    family = ctx.family
    xl_base = (
        family.name == "sdxl" and not family.inpainting
        if family is not None
        else base_unet.config.get("addition_embed_type") == "text_time"
    )
    if not xl_base or base_unet.config.in_channels != pipe.unet.config.in_channels:
        label = family.label if family is not None else "another architecture"
        raise InvalidParameterError(
            f"`refiner_checkpoint` {name!r} is an SDXL refiner; it refines SDXL checkpoints "
            f"only, not {plan.checkpoint!r} ({label})"
        )
    unet = pipe.unet
    pooled_dim = int(pipe.text_encoder_2.config.projection_dim)
    expected = int(unet.add_embedding.linear_1.in_features)
    if unet.config.addition_time_embed_dim * 5 + pooled_dim != expected:
        raise InvalidParameterError(
            f"`refiner_checkpoint` {name!r}: its UNet takes {expected} added conditioning "
            "values, not the pooled text embedding plus 5 time ids of an SDXL refiner"
        )
    embeds = prompts.encode(
        pipe,
        plan.prompt,
        plan.negative_prompt,
        plan.clip_skip,
        plan.request.batch_size,
        max_chunks=ctx.settings.max_prompt_chunks,
    )
    negative, negative_pooled = (
        embeds["negative_prompt_embeds"],
        embeds["negative_pooled_prompt_embeds"],
    )
    if not plan.negative_prompt:
        # A1111 zeros an empty negative prompt's conds on every SDXL model; the
        # refiner's diffusers config (`force_zeros_for_empty_prompt` false) would not.
        negative, negative_pooled = (
            negative.new_zeros(negative.shape),
            negative_pooled.new_zeros(negative_pooled.shape),
        )
    return RefinerConditioning(
        prompt_embeds=embeds["prompt_embeds"],
        negative_prompt_embeds=negative,
        pooled=embeds["pooled_prompt_embeds"],
        negative_pooled=negative_pooled,
        aesthetic_score=plan.refiner.aesthetic_score,
        negative_aesthetic_score=plan.refiner.negative_aesthetic_score,
    )


def switch_step(plan: Plan, steps_run: int) -> int:
    """The step index from which the refiner denoises (A1111: completed share >= switch)."""
    assert plan.refiner is not None
    return math.ceil(plan.refiner.switch_at * steps_run - 1e-9)


def run(plan: Plan, ctx: StageContext, batch: Batch) -> Batch:
    return batch  # the switch happened inside the last pass (`runtime.stages.denoise.call`)
