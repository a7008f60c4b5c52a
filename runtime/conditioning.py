"""Extra conditioning for the denoise passes: how a feature such as ControlNet plugs in.

A `ConditioningProvider` reads its `alwayson_scripts` entry (`script`, matched
case-insensitively as A1111 matches script titles) and returns a
`runtime.stages.types.Conditioning` for the request, or None when it has
nothing to add. Its `build` runs in stage 1, before any model work, so it
checks its arguments and fetches its weights there; the denoise stage then
calls `Conditioning.pipeline` once and merges `Conditioning.call_kwargs` into
every pipeline call. Register a provider by adding it to `PROVIDERS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from runtime.models import Models
    from runtime.settings import RuntimeSettings
    from runtime.stages.types import Conditioning, Plan


class ConditioningProvider(Protocol):
    #: The `alwayson_scripts` key it reads ("controlnet").
    script: str

    def build(
        self, args: Any, plan: Plan, models: Models, settings: RuntimeSettings
    ) -> Conditioning | None: ...


def _registered() -> list[ConditioningProvider]:
    from runtime.controlnet import PROVIDER as CONTROLNET

    return [CONTROLNET]


#: Registered providers, in the order their conditioning is applied.
PROVIDERS: list[ConditioningProvider] = _registered()


def build_conditioning(plan: Plan, models: Models, settings: RuntimeSettings) -> list[Conditioning]:
    """The conditioning of every provider whose script the request names."""
    scripts = {k.lower(): v for k, v in plan.request.alwayson_scripts.items()}
    built = []
    for provider in PROVIDERS:
        if provider.script in scripts:
            conditioning = provider.build(scripts[provider.script], plan, models, settings)
            if conditioning is not None:
                built.append(conditioning)
    return built
