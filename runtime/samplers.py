"""The one table from A1111 sampler and schedule-type names to diffusers schedulers.

A1111 (1.9+) names a sampler and a schedule type separately (`sampler_name`
"DPM++ 2M" + `scheduler` "Karras"); older clients send one name ("DPM++ 2M
Karras"), which A1111 splits by the schedule label at its end. Both forms
resolve here to one `SamplerChoice`: a diffusers scheduler class name and the
keyword arguments for `from_config`. The mapping follows the diffusers docs
("A1111/k-diffusion → diffusers" in `api/schedulers/overview`); samplers
diffusers cannot honour (DPM fast, DPM adaptive, DPM++ 2S a, Restart, DDIM
CFG++) are refused with the list of supported names rather than silently
replaced, unlike A1111 which falls back to its first sampler.

Pure: no torch or diffusers import; `render.py` turns a choice into a scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdeks.errors import InvalidParameterError


@dataclass(frozen=True)
class Schedule:
    """An A1111 schedule type (`/sdapi/v1/schedulers`) and the diffusers options it sets."""

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


AUTOMATIC = Schedule("automatic", "Automatic")
UNIFORM = Schedule("uniform", "Uniform")
KARRAS = Schedule("karras", "Karras", kwargs={"use_karras_sigmas": True})
EXPONENTIAL = Schedule("exponential", "Exponential", kwargs={"use_exponential_sigmas": True})
BETA = Schedule("beta", "Beta", kwargs={"use_beta_sigmas": True})
# diffusers docs: "sgm_uniform" ≈ timestep_spacing="trailing".
SGM_UNIFORM = Schedule(
    "sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), kwargs={"timestep_spacing": "trailing"}
)
# A1111's "Simple" (ComfyUI's simple_scheduler, the Forge default) takes every
# (1000 / steps)-th sigma of the model's table counting from its end: the timesteps of
# diffusers' "trailing" spacing (up to int-vs-round at each step).
SIMPLE = Schedule("simple", "Simple", kwargs={"timestep_spacing": "trailing"})

SCHEDULES: tuple[Schedule, ...] = (
    AUTOMATIC,
    UNIFORM,
    KARRAS,
    EXPONENTIAL,
    SGM_UNIFORM,
    BETA,
    SIMPLE,
)

#: A1111 schedule types we know but cannot reproduce with diffusers' options.
UNSUPPORTED_SCHEDULES = (
    "Polyexponential",
    "KL Optimal",
    "Align Your Steps",
    "Normal",
    "DDIM",
)

_SIGMA_SCHEDULES = frozenset({"uniform", "karras", "exponential", "beta", "sgm_uniform", "simple"})
_SPACING_ONLY = frozenset({"uniform", "sgm_uniform", "simple"})


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler (`/sdapi/v1/samplers`) and the diffusers scheduler behind it."""

    name: str
    aliases: tuple[str, ...]
    scheduler_class: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Schedule names (besides "automatic") this scheduler class can follow.
    schedules: frozenset[str] = _SIGMA_SCHEDULES
    #: What "Automatic" means for this sampler (A1111's `options["scheduler"]`).
    default_schedule: Schedule = UNIFORM
    #: Needs per-image Brownian noise seeds (DPMSolverSDEScheduler).
    brownian: bool = False


_SDE = {"algorithm_type": "sde-dpmsolver++"}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "DPMSolverMultistepScheduler", default_schedule=KARRAS),
    Sampler(
        "DPM++ SDE",
        ("k_dpmpp_sde",),
        "DPMSolverSDEScheduler",
        default_schedule=KARRAS,
        brownian=True,
    ),
    Sampler(
        "DPM++ 2M SDE",
        ("k_dpmpp_2m_sde",),
        "DPMSolverMultistepScheduler",
        _SDE,
        default_schedule=EXPONENTIAL,
    ),
    Sampler(
        "DPM++ 2M SDE Heun",
        ("k_dpmpp_2m_sde_heun",),
        "DPMSolverMultistepScheduler",
        {**_SDE, "solver_type": "heun"},
        default_schedule=EXPONENTIAL,
    ),
    Sampler(
        "DPM++ 3M SDE",
        ("k_dpmpp_3m_sde",),
        "DPMSolverMultistepScheduler",
        {**_SDE, "solver_order": 3},
        default_schedule=EXPONENTIAL,
    ),
    Sampler(
        "Euler a",
        ("k_euler_a", "k_euler_ancestral"),
        "EulerAncestralDiscreteScheduler",
        schedules=_SPACING_ONLY,
    ),
    Sampler("Euler", ("k_euler",), "EulerDiscreteScheduler"),
    Sampler("LMS", ("k_lms",), "LMSDiscreteScheduler"),
    Sampler("Heun", ("k_heun",), "HeunDiscreteScheduler"),
    Sampler("DPM2", ("k_dpm_2",), "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", ("k_dpm_2_a",), "KDPM2AncestralDiscreteScheduler"),
    Sampler("DDIM", ("ddim",), "DDIMScheduler", schedules=_SPACING_ONLY),
    Sampler("PLMS", ("plms",), "PNDMScheduler", {"skip_prk_steps": True}, schedules=_SPACING_ONLY),
    Sampler("UniPC", ("unipc",), "UniPCMultistepScheduler"),
    Sampler("LCM", ("k_lcm",), "LCMScheduler", schedules=_SPACING_ONLY),
)

#: A1111 samplers we know but diffusers cannot honour.
UNSUPPORTED_SAMPLERS = ("DPM fast", "DPM adaptive", "DPM++ 2S a", "Restart", "DDIM CFG++")

_SAMPLER_BY_NAME: dict[str, Sampler] = {}
for _s in SAMPLERS:
    for _n in (_s.name, *_s.aliases):
        _SAMPLER_BY_NAME[_n.lower()] = _s

_SCHEDULE_BY_NAME: dict[str, Schedule] = {}
for _sch in SCHEDULES:
    for _n in (_sch.name, _sch.label, *_sch.aliases):
        _SCHEDULE_BY_NAME[_n.lower()] = _sch


@dataclass(frozen=True)
class SamplerChoice:
    sampler: Sampler
    #: The schedule actually followed ("Automatic" already resolved).
    schedule: Schedule
    #: What the request said, for infotexts: "Automatic" stays "Automatic".
    schedule_label: str

    @property
    def scheduler_class(self) -> str:
        return self.sampler.scheduler_class

    @property
    def scheduler_kwargs(self) -> dict[str, Any]:
        return {**self.sampler.kwargs, **self.schedule.kwargs}


def supported_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def resolve(sampler_name: str | None, scheduler: str | None = None) -> SamplerChoice:
    """A1111's `get_sampler_and_scheduler`, but unknown names are errors, not fallbacks.

    `sampler_name` may carry a schedule label at its end ("DPM++ 2M Karras");
    that suffix wins over `scheduler`, as in A1111.
    """
    name = (sampler_name or "Euler").strip()
    schedule = _find_schedule(scheduler)
    for candidate in SCHEDULES[1:]:
        for option in (candidate.label, candidate.name, *candidate.aliases):
            suffix = " " + option
            if name.lower().endswith(suffix.lower()) and len(name) > len(suffix):
                schedule = candidate
                name = name[: -len(suffix)]
                break
        else:
            continue
        break
    sampler = _SAMPLER_BY_NAME.get(name.lower())
    if sampler is None:
        raise InvalidParameterError(
            f"`sampler_name` {sampler_name!r} is not supported; supported samplers: "
            f"{', '.join(supported_names())} (each optionally followed by a schedule type: "
            f"{', '.join(s.label for s in SCHEDULES[1:])})"
        )
    followed = sampler.default_schedule if schedule is AUTOMATIC else schedule
    if followed.name not in sampler.schedules:
        allowed = sorted(_SCHEDULE_BY_NAME[n].label for n in sampler.schedules)
        raise InvalidParameterError(
            f"`scheduler` {followed.label!r} is not supported with sampler {sampler.name!r}; "
            f"use one of: Automatic, {', '.join(allowed)}"
        )
    label = schedule.label
    if schedule is not AUTOMATIC and schedule is sampler.default_schedule:
        label = AUTOMATIC.label  # A1111 reports the sampler's own default as Automatic
    return SamplerChoice(sampler=sampler, schedule=followed, schedule_label=label)


def _find_schedule(scheduler: str | None) -> Schedule:
    if scheduler is None or not scheduler.strip():
        return AUTOMATIC
    found = _SCHEDULE_BY_NAME.get(scheduler.strip().lower())
    if found is None:
        raise InvalidParameterError(
            f"`scheduler` {scheduler!r} is not supported; supported schedule types: "
            f"{', '.join(s.label for s in SCHEDULES)}"
        )
    return found
