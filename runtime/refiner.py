"""Stage 5, the refiner (`refiner_checkpoint`, `refiner_switch_at`), with A1111's meaning.

A1111 switches the model in the middle of sampling: once the completed share
of the steps reaches `refiner_switch_at`, the remaining steps of the same
sampler run on the refiner checkpoint's UNet (`apply_refiner`). Here the
job's pipeline swaps its UNet for the refiner's from the step hook, so the
scheduler, its state and the latents carry on untouched. The switch happens in
the last pass: the hires pass when there is one (A1111's default
`hires_fix_refiner_pass` "second pass"), else the first.

`refiner_checkpoint` None, "", "None" or "Use same checkpoint" means no
refiner (`runtime.values.is_unset`). `refiner_switch_at` absent means the
refiner from the first step, as in A1111; 1 or more means never. The refiner must share the base model's
architecture (an SD 1.x refiner for an SD 1.x base, an SDXL base checkpoint
for an SDXL base); the SDXL *refiner* architecture (its own text encoder and
conditioning) is refused with an error naming it. The infotext gains
`Refiner: <name>` and `Refiner switch at: <fraction>`.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from runtime.stages.types import Batch, Plan, StageContext
from runtime.values import is_unset
from sdeks.errors import InvalidParameterError


@dataclass(frozen=True)
class RefinerPlan:
    checkpoint: str
    switch_at: float


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
    return RefinerPlan(checkpoint=name, switch_at=float(switch or 0.0))


def extra_params(refiner: RefinerPlan) -> dict[str, Any]:
    return {"Refiner": refiner.checkpoint, "Refiner switch at": refiner.switch_at}


def enabled(plan: Plan) -> bool:
    return plan.refiner is not None


def steps(plan: Plan) -> int:
    return 0  # the refiner runs the last steps of a pass; they are counted there


def attach(plan: Plan, ctx: StageContext, stack: ExitStack) -> None:
    """Lease the refiner for the render and give the step hook its UNet (stage 2)."""
    refiner = plan.refiner
    assert refiner is not None
    lease = stack.enter_context(ctx.models.use(refiner.checkpoint, "txt2img"))
    unet = lease.pipeline.unet
    base = ctx.pipe.unet
    base = getattr(base, "_orig_mod", base)
    if unet.config.cross_attention_dim != base.config.cross_attention_dim or (
        unet.config.in_channels != base.config.in_channels
    ):
        raise InvalidParameterError(
            f"`refiner_checkpoint` {refiner.checkpoint!r} has another architecture than "
            f"{plan.checkpoint!r} (cross-attention {unet.config.cross_attention_dim} vs "
            f"{base.config.cross_attention_dim}); only refiners of the base model's "
            "architecture are supported"
        )
    ctx.refiner_unet = unet


def switch_step(plan: Plan, steps_run: int) -> int:
    """The step index from which the refiner denoises (A1111: completed share >= switch)."""
    assert plan.refiner is not None
    return math.ceil(plan.refiner.switch_at * steps_run - 1e-9)


def run(plan: Plan, ctx: StageContext, batch: Batch) -> Batch:
    return batch  # the switch happened inside the last pass (`runtime.stages.denoise.call`)
