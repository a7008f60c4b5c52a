"""The job API the dispatcher calls.

    POST /v1/jobs               render a `sdeks.job.Job`, store outputs, publish, answer the Callback
    POST /v1/jobs/{id}/cancel   stop a running job between steps (it ends `cancelled`)
    POST /v1/prefetch           {"model": name}: bring a model to disk/RAM ahead of use

`/v1/jobs` answers 429 when no slot is free (the dispatcher tries another pod),
and 429 with code `reserved` while the pod holds first call for another
dispatcher replica and the job would switch its model (`sdeks.grace`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from runtime.control import JobControl, SupersededError
from runtime.outputs import OutputError, OutputWriter
from runtime.pod import PodDep
from sdeks.callback import Callback, ErrorInfo, TaskStatus
from sdeks.errors import ModelNotFoundError
from sdeks.job import Job
from sdeks.lifecycle import Reporter
from sdeks.tasks import planned_steps

log = logging.getLogger(__name__)

router = APIRouter(tags=["pod"])


class PrefetchRequest(BaseModel):
    model: str


@router.post("/v1/jobs", response_model=Callback)
async def post_job(job: Job, pod: PodDep) -> Any:
    settings = pod.settings
    writer, reporter = pod.writer, pod.reporter
    if writer is None or reporter is None:
        return JSONResponse(
            {"detail": "SDEKS_CALLBACK_TOPIC_ARN and SDEKS_OUTPUT_BUCKET are not set"},
            status_code=503,
        )
    task = job.task
    if task.id in pod.running:
        return JSONResponse(
            {"code": "already_running", "message": f"task {task.id} is already running"},
            status_code=409,
        )
    model = job.model or settings.default_model or ""
    held = pod.first_call.refuses(job.replica, model)
    if held is not None:
        pod.metrics.reserved.inc()
        return JSONResponse(
            {
                "code": "reserved",
                "message": f"first call for replica {held.replica} (model {held.model[:100]})",
                "reserved": held.to_json(),
            },
            status_code=429,
            headers={"Retry-After": "1"},
        )
    control = JobControl(job_id=task.id)
    control.limit_time(settings.task_time_limit_s)  # checked between steps: one `timeout`
    received = time.time()
    # This render attempt: a later attempt of the same task (after a dispatcher or
    # pod died) fences this one out of outputs, progress and the claim.
    run = uuid.uuid4().hex
    async with pod.slot(control, wait=False) as free, _first_call_after(pod, job, model, free):
        if not free:
            pod.metrics.rejected.inc()
            return JSONResponse(
                {"detail": "no free slot", "free_slots": 0},
                status_code=429,
                headers={"Retry-After": "1"},
            )
        try:
            # 1. Mark it running; False: it ended elsewhere or a cancel came first.
            if not await reporter.running(
                task, pod=settings.pod_name, total_steps=planned_steps(task.content), run=run
            ):
                callback = _cancelled_before_start(job, writer)
                if await reporter.finish(callback):  # cancel requested: ended here
                    return callback
                # It had already ended elsewhere and nothing was published here:
                # answering 200 would tell the dispatcher the callback exists. 409
                # sends it back through the task table, which deletes the message
                # once that end is confirmed published, or republishes it if its
                # publisher died between claim and publish.
                return JSONResponse(
                    {"code": "already_ended", "message": f"task {task.id} already ended"},
                    status_code=409,
                )
            # 2. Render and store outputs in a worker thread, reporting progress.
            control.on_progress = _progress_reporter(reporter, task.id, control, run)
            loop = asyncio.get_running_loop()

            def may_write() -> bool:
                ask = reporter.may_write_outputs(task.id, run=run)
                return asyncio.run_coroutine_threadsafe(ask, loop).result(timeout=60)

            def work() -> Callback:
                # Looked up at call time, so a test harness can wrap run_job.
                from runtime.jobs import run_job

                return run_job(
                    job,
                    renderer=pod.renderer,
                    writer=writer,
                    options=dict(pod.options),
                    control=control,
                    received_at=received,
                    may_write=may_write,
                )

            try:
                callback = await asyncio.to_thread(work)
            except SupersededError:
                log.warning(
                    "task %s: another attempt took it over; this one wrote and published nothing",
                    task.id,
                    extra={"task_id": task.id},
                )
                return JSONResponse(
                    {"code": "superseded", "message": f"another attempt runs task {task.id}"},
                    status_code=409,
                )
            # 3. Claim the terminal state and publish (exactly once per task id).
            if not await reporter.finish(callback, run=run):
                log.info("task %s had already ended; callback not published", task.id)
        except OutputError as exc:
            log.error("outputs of task %s failed: %s", task.id, exc, extra={"task_id": task.id})
            return JSONResponse(exc.to_error(), status_code=502)
        except Exception as exc:  # table or SNS: nothing (confirmed) published, retry
            log.exception("reporting task %s failed", task.id, extra={"task_id": task.id})
            return JSONResponse(
                {"code": "report_failed", "message": f"{type(exc).__name__}: {exc}"[:300]},
                status_code=502,
            )
    t = callback.timings
    log.info(
        "task %s %s: %d images in %d ms (model %d, inference %d, upload %d, queued %d)",
        task.id,
        callback.status.value,
        len(callback.image_url),
        t.total_ms,
        t.model_load_ms,
        t.inference_ms,
        t.upload_ms,
        t.queued_ms,
        extra={"task_id": task.id},
    )
    pod.metrics.jobs.labels("jobs", task.tasktype.value, callback.status.value).inc()
    pod.metrics.images.labels(task.tasktype.value).inc(len(callback.image_url))
    pod.metrics.observe_timings(callback.timings.model_dump())
    return callback


@asynccontextmanager
async def _first_call_after(pod: Any, job: Job, model: str, ran: bool) -> AsyncIterator[None]:
    """Once the job's slot frees, hold the pod a moment for its replica (`sdeks.grace`)."""
    try:
        yield
    finally:
        if ran:
            pod.first_call.ended(job.replica, model)


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, pod: PodDep) -> Any:
    control = pod.running.get(job_id)
    if control is None:
        return JSONResponse({"id": job_id, "cancelled": False}, status_code=404)
    control.cancel()
    return {"id": job_id, "cancelled": True}


@router.post("/v1/prefetch", status_code=202)
async def prefetch(body: PrefetchRequest, pod: PodDep) -> Any:
    try:
        await asyncio.to_thread(pod.models.prefetch, body.model)
    except ModelNotFoundError as exc:
        return JSONResponse(exc.to_error(), status_code=404)
    return {"model": body.model, "accepted": True}


def _progress_reporter(
    reporter: Reporter, task_id: str, control: JobControl, run: str | None = None
) -> Callable[[int, int], None]:
    """A step hook for the render thread: records progress on the event loop without
    waiting for it, and cancels the render when the table says stop (`sdeks cancel`)."""
    loop = asyncio.get_running_loop()
    pending: Future[bool] | None = None

    def report(done: int, total: int) -> None:
        nonlocal pending
        if pending is not None:
            if not pending.done():
                return  # the previous write is still on its way; skip this step
            try:
                keep_going = pending.result()
            except Exception:  # a failed progress write must not fail a render
                log.warning("task %s: progress write failed", task_id, exc_info=True)
                keep_going = True
            if not keep_going:
                log.info("task %s: cancel requested, stopping", task_id)
                control.cancel()
                return
        pending = asyncio.run_coroutine_threadsafe(
            reporter.progress(task_id, done, total, run=run), loop
        )

    return report


def _cancelled_before_start(job: Job, writer: OutputWriter) -> Callback:
    task = job.task
    return Callback.for_task(
        task,
        TaskStatus.CANCELLED,
        output_location=writer.output_location(task),
        error=ErrorInfo(code="cancelled", message="cancel requested before rendering started"),
    )
