"""Stage 5, the SDXL refiner (`refiner_checkpoint`, `refiner_switch_at`).

Not yet supported: `check` refuses `refiner_checkpoint`.
"""

from __future__ import annotations

from typing import Any

from runtime.stages.types import Batch, Plan, StageContext
from sdeks.errors import InvalidParameterError


def check(plan: Plan, models: Any) -> None:
    request = plan.request
    if request.refiner_checkpoint:
        raise InvalidParameterError(
            f"`refiner_checkpoint` {request.refiner_checkpoint!r}: refiners are not supported "
            "by this runtime"
        )


def enabled(plan: Plan) -> bool:
    return False


def steps(plan: Plan) -> int:
    return 0


def run(plan: Plan, ctx: StageContext, batch: Batch) -> Batch:
    return batch
