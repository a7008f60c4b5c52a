"""Stage 4, the hires pass (A1111 "hires fix", txt2img `enable_hr`).

Not yet supported: `check` refuses `enable_hr`.
"""

from __future__ import annotations

from typing import Any

from runtime.a1111 import Txt2ImgRequest
from runtime.stages.types import Batch, Plan, StageContext
from sdeks.errors import InvalidParameterError


def check(plan: Plan, models: Any) -> None:
    if enabled(plan):
        raise InvalidParameterError("`enable_hr` (hires fix) is not supported by this runtime")


def enabled(plan: Plan) -> bool:
    request = plan.request
    return isinstance(request, Txt2ImgRequest) and bool(request.enable_hr)


def steps(plan: Plan) -> int:
    return 0


def run(plan: Plan, ctx: StageContext, batch: Batch, embeds: dict[str, Any]) -> Batch:
    return batch
