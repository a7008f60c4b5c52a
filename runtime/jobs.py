"""One `POST /v1/jobs` job, from its A1111 body to its callback (runs in a worker thread).

    parse the A1111 body -> render -> PNGs + manifest to S3 -> the Callback

A failure of the task itself (bad parameter, unknown model, out of memory,
cancelled, or a bug while rendering) still writes the manifest and yields a
failed callback: the task is over, the dispatcher must not retry it. Only an
`OutputError` (S3 unreachable) escapes, so the dispatcher can retry. The app
publishes the callback through `sdeks.lifecycle.Reporter` (claim-then-publish:
exactly one terminal callback per task id).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from runtime.a1111 import (
    ExtrasBatchImagesRequest,
    ExtrasSingleImageRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    ignored_fields,
    parse_request,
)
from runtime.control import SupersededError
from runtime.outputs import OutputError, OutputWriter
from runtime.render import JobControl, Renderer, RenderResult, encode_png
from sdeks.callback import Callback, ErrorInfo, Manifest, TaskStatus, Timings
from sdeks.envelope import TaskType, requested_model
from sdeks.errors import SdeksError, TaskCancelledError
from sdeks.job import Job

log = logging.getLogger(__name__)


def render_task(
    job: Job, renderer: Renderer, options: Mapping[str, Any], control: JobControl
) -> RenderResult:
    task = job.task
    request = parse_request(task.tasktype, task.content)
    # `job.model` is what the dispatcher scheduled for; without one the renderer
    # reads the checkpoint the request names.
    model = job.model
    if task.tasktype is TaskType.TEXT_TO_IMAGE:
        assert isinstance(request, Txt2ImgRequest)
        return renderer.txt2img(request, options=options, model=model, control=control)
    if task.tasktype is TaskType.IMAGE_TO_IMAGE:
        assert isinstance(request, Img2ImgRequest)
        return renderer.img2img(request, options=options, model=model, control=control)
    assert isinstance(request, ExtrasSingleImageRequest | ExtrasBatchImagesRequest)
    return renderer.extras(request, options=options, control=control)


def run_job(
    job: Job,
    *,
    renderer: Renderer,
    writer: OutputWriter,
    options: Mapping[str, Any],
    control: JobControl,
    received_at: float | None = None,
    may_write: Callable[[], bool] | None = None,
) -> Callback:
    """Render `job`, store its outputs and manifest, and return its (unpublished) callback.

    `may_write` is asked just before anything goes to S3: False (another attempt of
    the task took it over) raises `SupersededError` with nothing written, so the
    outputs in S3 are the ones the published callback reports."""
    task = job.task
    received_at = received_at or time.time()
    started = time.time()
    timings = Timings(download_ms=job.download_ms)
    if job.published_at:
        timings.queued_ms = max(0, int((started - job.published_at) * 1000))

    result: RenderResult | None = None
    error: ErrorInfo | None = None
    status = TaskStatus.SUCCEEDED
    try:
        result = render_task(job, renderer, options, control)
        timings.model_load_ms = result.model_load_ms
        timings.inference_ms = max(0, int((time.time() - started) * 1000) - result.model_load_ms)
    except TaskCancelledError as exc:
        status, error = TaskStatus.CANCELLED, ErrorInfo.from_exception(exc)
    except SdeksError as exc:
        status, error = TaskStatus.FAILED, ErrorInfo.from_exception(exc)
    except Exception as exc:  # a bug while rendering still ends the task with a callback
        log.exception("render failed", extra={"task_id": task.id})
        status, error = TaskStatus.FAILED, ErrorInfo.from_exception(exc)
    if error:
        log.info("task %s %s: %s", task.id, status.value, error.code, extra={"task_id": task.id})
    from runtime.stages.prepare import supported_alwayson_scripts

    ignored = ignored_fields(task.tasktype, task.content, supported_alwayson_scripts())
    if ignored:
        log.warning(
            "task %s: ignored unknown fields %s", task.id, ignored, extra={"task_id": task.id}
        )

    if may_write is not None and not may_write():
        raise SupersededError(task.id)
    upload_start = time.time()
    keys: list[str] = []
    if result is not None:
        pngs = [
            encode_png(image, text)
            for image, text in zip(result.images, result.infotexts, strict=True)
        ]
        keys = writer.write_images(task, pngs)
    manifest = Manifest(
        id=task.id,
        runtime=task.runtime,
        tasktype=task.tasktype.value,
        status=status,
        model=result.model if result else (job.model or requested_model(task.content)),
        output_location=writer.output_location(task),
        images=keys,
        seeds=result.seeds if result else [],
        parameters=result.parameters if result else {},
        info=result.info if result else None,
        timings=timings,
        error=error,
        context=task.context,
        ignored_fields=ignored,
    )
    timings.upload_ms = int((time.time() - upload_start) * 1000)
    timings.total_ms = int((time.time() - received_at) * 1000) + timings.download_ms
    manifest.timings = timings
    manifest_key = writer.write_manifest(task, manifest)

    # Fitted to one SNS message by the shared rule (`Callback.fitted`: info first,
    # then context, which the manifest keeps whole).
    return Callback.for_task(
        task,
        status,
        output_location=writer.output_location(task),
        image_url=[writer.url(k) for k in keys],
        output_url=writer.url(manifest_key),
        seeds=manifest.seeds,
        error=error,
        timings=timings,
        info=manifest.info,
        ignored_fields=ignored,
    ).fitted()


__all__ = ["OutputError", "SupersededError", "render_task", "run_job"]
