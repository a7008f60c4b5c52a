"""Operations: `/health`, `/metrics`, `/v1/state`.

`POST /v1/state` is the dispatcher's poll with its report: the waiting tasks
per model one replica holds (`sdeks.demand.DemandReport`). The pod keeps each
replica's last report until it expires and answers the state with `demand`,
the sum of the other replicas' reports, so replicas see one another's work.
`GET /v1/state` shows the sum of every replica's report.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from runtime.pod import PodDep
from sdeks.demand import DemandError, DemandReport

router = APIRouter(tags=["pod"])

#: A report is at most `MAX_MODELS` names of `MAX_NAME` characters: well under this.
MAX_REPORT_BYTES = 128 * 1024


@router.get("/health")
async def health(pod: PodDep) -> dict[str, Any]:
    return {"status": "ok", "runtime": pod.settings.runtime, "busy": pod.busy}


@router.get("/metrics")
async def metrics(pod: PodDep) -> Response:
    return Response(pod.metrics.render(), media_type=pod.metrics.content_type)


@router.get("/v1/state")
async def state(pod: PodDep) -> dict[str, Any]:
    doc = await asyncio.to_thread(pod.state)
    return _with_demand(doc, pod, None)


@router.post("/v1/state", response_model=None)
async def report_and_state(request: Request, pod: PodDep) -> dict[str, Any] | JSONResponse:
    try:
        report = DemandReport.parse(await _json_body(request))
    except DemandError as exc:
        return JSONResponse(exc.to_error(), status_code=400)
    pod.demand.report(report)
    doc = await asyncio.to_thread(pod.state)
    return _with_demand(doc, pod, report.replica)


def _with_demand(doc: dict[str, Any], pod: Any, replica: str | None) -> dict[str, Any]:
    demand, other = pod.demand.others(replica)
    return {**doc, "demand": demand, "demand_other": other}


async def _json_body(request: Request) -> Any:
    """The body as JSON, read no further than `MAX_REPORT_BYTES`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_REPORT_BYTES):
        raise DemandError(f"body: at most {MAX_REPORT_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REPORT_BYTES:
            raise DemandError(f"body: at most {MAX_REPORT_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise DemandError(f"body: not JSON ({exc})"[:200]) from exc
