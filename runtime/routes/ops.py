"""Operations: `/health`, `/metrics`, `/v1/state`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from runtime.pod import PodDep

router = APIRouter(tags=["pod"])


@router.get("/health")
async def health(pod: PodDep) -> dict[str, Any]:
    return {"status": "ok", "runtime": pod.settings.runtime, "busy": pod.busy}


@router.get("/metrics")
async def metrics(pod: PodDep) -> Response:
    return Response(pod.metrics.render(), media_type=pod.metrics.content_type)


@router.get("/v1/state")
async def state(pod: PodDep) -> dict[str, Any]:
    return await asyncio.to_thread(pod.state)
