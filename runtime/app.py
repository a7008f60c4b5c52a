"""The pod's HTTP API (FastAPI): the job API the dispatcher calls, and A1111's `/sdapi/v1/*`.

    POST /v1/jobs               render a `sdeks.job.Job`, store outputs, publish, answer the Callback
    GET  /v1/state              models per tier, busy, free slots, running jobs with progress
    POST /v1/jobs/{id}/cancel   stop a running job between steps (it ends `cancelled`)
    POST /v1/prefetch           {"model": name}: bring a model to disk/RAM ahead of use
    /sdapi/v1/...               the A1111 API (txt2img, img2img, extra-single-image, options, ...)
    GET  /health, /metrics

Rendering runs in worker threads (`asyncio.to_thread`) so the event loop keeps
answering `/v1/state`, `/progress` and cancels while a job renders. `slots`
jobs render at once: `/v1/jobs` answers 429 when none is free (the dispatcher
tries another pod); A1111 requests wait their turn as A1111 queues them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from runtime import a1111, infotext, samplers
from runtime.families import preload_pipeline_classes
from runtime.metrics import PodMetrics
from runtime.model_catalog import first_checkpoint
from runtime.models import Models
from runtime.outputs import OutputError, OutputWriter
from runtime.render import (
    DEFAULT_OPTIONS,
    UPSCALERS,
    JobControl,
    Renderer,
    RenderResult,
    encode_png,
)
from runtime.settings import RuntimeSettings
from sdeks.callback import Callback, ErrorInfo, TaskStatus
from sdeks.errors import (
    InvalidParameterError,
    ModelLoadError,
    ModelNotFoundError,
    OutOfMemoryError,
    SdeksError,
    TaskCancelledError,
)
from sdeks.job import Job
from sdeks.lifecycle import Reporter

log = logging.getLogger(__name__)

_A1111_STATUS = {
    InvalidParameterError: 422,
    ModelNotFoundError: 404,
    ModelLoadError: 500,
    OutOfMemoryError: 507,
    TaskCancelledError: 409,
}


class PrefetchRequest(BaseModel):
    model: str


class Pod:
    """Everything the handlers share: settings, renderer, slots, running jobs, A1111 options."""

    def __init__(
        self,
        settings: RuntimeSettings,
        models: Models,
        renderer: Renderer,
        writer: OutputWriter | None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.renderer = renderer
        self.writer = writer
        #: Publishes callbacks (claim-then-publish with a task table); built at start-up.
        self.reporter: Reporter | None = None
        self.metrics = PodMetrics(settings.runtime, settings.slots)
        self.options: dict[str, Any] = {
            **DEFAULT_OPTIONS,
            "sd_model_checkpoint": settings.default_model,
        }
        self.running: dict[str, JobControl] = {}
        self.a1111_ids: set[str] = set()
        self._slots: asyncio.Semaphore | None = None
        self.started = time.time()

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # created in the running loop
            self._slots = asyncio.Semaphore(self.settings.slots)
        return self._slots

    @property
    def busy(self) -> int:
        return len(self.running)

    def state(self) -> dict[str, Any]:
        try:
            models = self.models.state()
        except Exception as exc:  # a listing failure must not hide the pod's own state
            models = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        return {
            "runtime": self.settings.runtime,
            "device": self.renderer.device,
            "models": models,
            "default_model": self.settings.default_model,
            "busy": self.busy > 0,
            "slots": self.settings.slots,
            "free_slots": max(0, self.settings.slots - self.busy),
            "running": [
                {
                    "id": job_id,
                    "progress": round(c.progress, 4),
                    "step": c.step,
                    "steps": c.steps,
                    "job_no": c.job_no,
                    "job_count": c.job_count,
                    "elapsed_s": round(time.time() - c.started, 3),
                }
                for job_id, c in self.running.items()
            ],
        }

    @asynccontextmanager
    async def slot(self, control: JobControl, *, wait: bool) -> AsyncIterator[bool]:
        """Hold a slot for `control`'s job. Yields False (holding nothing) when `wait` is
        False and every slot is taken."""
        if not wait and self.slots.locked():
            yield False
            return
        async with self.slots:
            self.running[control.job_id] = control
            self.metrics.busy.set(self.busy)
            try:
                yield True
            finally:
                self.running.pop(control.job_id, None)
                self.metrics.busy.set(self.busy)

    async def run(self, control: JobControl, fn: Callable[[], Any]) -> Any:
        """Run `fn` in a worker thread once a slot is free (A1111 requests queue)."""
        async with self.slot(control, wait=True):
            return await asyncio.to_thread(fn)


def create_app(
    settings: RuntimeSettings,
    *,
    models: Models | None = None,
    writer: OutputWriter | None = None,
) -> FastAPI:
    """The pod app. `models` (the store) and `writer` are built from `settings` when not injected."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if models is None:
        from runtime.models import build_store

        models = build_store(settings, resolve_device(settings.device))
    if not settings.default_model:
        # A1111 always has a model loaded: the first checkpoint it finds.
        settings = settings.model_copy(update={"default_model": first_checkpoint(models)})
    device = models.device
    if device.startswith("cuda"):
        import torch

        # TF32 matmuls for whatever still runs in fp32 (A100/H100: same images, faster).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if writer is None and settings.callback_topic_arn and settings.output_bucket:
        from sdeks import aws

        writer = OutputWriter(s3=aws.client("s3"), bucket=settings.output_bucket)
    pod = Pod(settings, models, Renderer(models, settings), writer)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "runtime pod %s up: device=%s slots=%d default_model=%s",
            settings.runtime,
            device,
            settings.slots,
            settings.default_model,
        )
        async with AsyncExitStack() as stack:
            if pod.reporter is None and pod.writer is not None:
                pod.reporter = await _build_reporter(settings, stack)
            # First lazy imports of diffusers are not thread-safe: do them all now,
            # before renders and prefetches start in worker threads.
            await asyncio.to_thread(preload_pipeline_classes)
            warm = None
            if settings.warm_default_model and settings.default_model:
                # In the background: /health answers at once, the first job finds it loaded.
                warm = asyncio.create_task(_warm(pod.models, settings.default_model))
            yield
            if warm is not None and not warm.done():
                warm.cancel()
            for control in list(pod.running.values()):
                control.cancel()
        close = getattr(pod.models, "close", None)
        if close is not None:
            close()

    app = FastAPI(
        title="sdeks runtime pod",
        description="Stable Diffusion runtime: the job API and the AUTOMATIC1111 API.",
        lifespan=lifespan,
    )
    app.state.pod = pod

    # --- health, metrics, state ------------------------------------------------

    @app.get("/health", tags=["pod"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "runtime": settings.runtime, "busy": pod.busy}

    @app.get("/metrics", tags=["pod"])
    async def metrics() -> Response:
        return Response(pod.metrics.render(), media_type=pod.metrics.content_type)

    @app.get("/v1/state", tags=["pod"])
    async def state() -> dict[str, Any]:
        return await asyncio.to_thread(pod.state)

    # --- the job API -----------------------------------------------------------

    @app.post("/v1/jobs", tags=["pod"], response_model=Callback)
    async def post_job(job: Job) -> Any:
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
        control = JobControl(job_id=task.id)
        received = time.time()
        async with pod.slot(control, wait=False) as held:
            if not held:
                pod.metrics.rejected.inc()
                return JSONResponse(
                    {"detail": "no free slot", "free_slots": 0},
                    status_code=429,
                    headers={"Retry-After": "1"},
                )
            try:
                # 1. Mark it running; False: it ended elsewhere or a cancel came first.
                if not await reporter.running(
                    task, pod=settings.pod_name, total_steps=_total_steps(task.content)
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
                control.on_progress = _progress_reporter(reporter, task.id, control)

                def work() -> Callback:
                    from runtime.jobs import run_job

                    return run_job(
                        job,
                        renderer=pod.renderer,
                        writer=writer,
                        options=dict(pod.options),
                        control=control,
                        received_at=received,
                    )

                callback = await asyncio.to_thread(work)
                # 3. Claim the terminal state and publish (exactly once per task id).
                if not await reporter.finish(callback):
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

    @app.post("/v1/jobs/{job_id}/cancel", tags=["pod"])
    async def cancel_job(job_id: str) -> Any:
        control = pod.running.get(job_id)
        if control is None:
            return JSONResponse({"id": job_id, "cancelled": False}, status_code=404)
        control.cancel()
        return {"id": job_id, "cancelled": True}

    @app.post("/v1/prefetch", tags=["pod"], status_code=202)
    async def prefetch(body: PrefetchRequest) -> Any:
        try:
            await asyncio.to_thread(pod.models.prefetch, body.model)
        except ModelNotFoundError as exc:
            return JSONResponse(exc.to_error(), status_code=404)
        return {"model": body.model, "accepted": True}

    # --- the A1111 API ---------------------------------------------------------

    async def a1111_generate(request: a1111.GenerationRequest, kind: str) -> Any:
        control = JobControl(job_id=f"a1111-{uuid.uuid4().hex[:12]}", keep_partial=True)
        options = dict(pod.options)

        def work() -> RenderResult:
            # The renderer reads the checkpoint the request names.
            if kind == "txt2img":
                assert isinstance(request, a1111.Txt2ImgRequest)
                return pod.renderer.txt2img(request, options=options, control=control)
            assert isinstance(request, a1111.Img2ImgRequest)
            return pod.renderer.img2img(request, options=options, control=control)

        pod.a1111_ids.add(control.job_id)
        try:
            result = await pod.run(control, work)
        except SdeksError as exc:
            pod.metrics.jobs.labels("a1111", kind, "failed").inc()
            return _a1111_error(exc)
        finally:
            pod.a1111_ids.discard(control.job_id)
        if request.override_settings and not request.override_settings_restore_afterwards:
            pod.options.update(request.override_settings)  # A1111: the overrides persist
        pod.metrics.jobs.labels("a1111", kind, "succeeded").inc()
        pod.metrics.images.labels(kind).inc(len(result.images))
        images = (
            [
                base64.b64encode(encode_png(im, text)).decode()
                for im, text in zip(result.images, result.infotexts, strict=True)
            ]
            if request.send_images
            else []
        )
        return a1111.ImageResponse(
            images=images, parameters=result.parameters, info=_json(result.info)
        )

    @app.post("/sdapi/v1/txt2img", tags=["a1111"], response_model=a1111.ImageResponse)
    async def txt2img(request: a1111.Txt2ImgRequest) -> Any:
        return await a1111_generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img", tags=["a1111"], response_model=a1111.ImageResponse)
    async def img2img(request: a1111.Img2ImgRequest) -> Any:
        return await a1111_generate(request, "img2img")

    @app.post(
        "/sdapi/v1/extra-single-image",
        tags=["a1111"],
        response_model=a1111.ExtrasSingleImageResponse,
    )
    async def extra_single_image(request: a1111.ExtrasSingleImageRequest) -> Any:
        result = await asyncio.to_thread(pod.renderer.extras, request)
        image = base64.b64encode(encode_png(result.images[0], result.infotexts[0])).decode()
        return a1111.ExtrasSingleImageResponse(html_info=result.infotexts[0], image=image)

    @app.get("/sdapi/v1/options", tags=["a1111"])
    async def get_options() -> dict[str, Any]:
        return dict(pod.options)

    @app.post("/sdapi/v1/options", tags=["a1111"])
    async def set_options(body: dict[str, Any] = Body(...)) -> Any:  # noqa: B008
        checkpoint = body.get("sd_model_checkpoint")
        if checkpoint is not None:
            if not isinstance(checkpoint, str):
                raise InvalidParameterError(
                    f"`sd_model_checkpoint` must be a string, got {checkpoint!r}"
                )
            # A1111 loads the model when it is set; an unknown one is refused.
            await asyncio.to_thread(pod.renderer.check_pinned, checkpoint)
            await asyncio.to_thread(pod.models.load, checkpoint)
        if "CLIP_stop_at_last_layers" in body:
            from runtime.render import clip_skip_of

            clip_skip_of(body["CLIP_stop_at_last_layers"])
        if body.get("sd_vae") is not None and body["sd_vae"] not in a1111.NO_VAE:
            await asyncio.to_thread(pod.models.fetch_vae, str(body["sd_vae"]))
        pod.options.update(body)
        return None

    @app.get("/sdapi/v1/sd-models", tags=["a1111"], response_model=list[a1111.SDModelItem])
    async def sd_models() -> Any:
        return [a1111.SDModelItem(**m) for m in await asyncio.to_thread(pod.models.sd_models)]

    @app.get("/sdapi/v1/sd-vae", tags=["a1111"], response_model=list[a1111.SDVaeItem])
    async def sd_vae() -> Any:
        vaes = await asyncio.to_thread(pod.models.vaes)
        return [a1111.SDVaeItem(model_name=v.model_name, filename=v.key) for v in vaes]

    @app.get("/sdapi/v1/loras", tags=["a1111"], response_model=list[a1111.LoraItem])
    async def loras() -> Any:
        found = await asyncio.to_thread(pod.models.loras)
        return [a1111.LoraItem(name=v.model_name, alias=v.model_name, path=v.key) for v in found]

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["a1111"])
    async def refresh_checkpoints() -> None:
        await asyncio.to_thread(pod.models.refresh)

    @app.get("/sdapi/v1/samplers", tags=["a1111"], response_model=list[a1111.SamplerItem])
    async def list_samplers() -> Any:
        return [
            a1111.SamplerItem(
                name=s.name,
                aliases=list(s.aliases),
                options={"scheduler": s.default_schedule.name}
                if s.default_schedule.name != "uniform"
                else {},
            )
            for s in samplers.SAMPLERS
        ]

    @app.get("/sdapi/v1/schedulers", tags=["a1111"], response_model=list[a1111.SchedulerItem])
    async def list_schedulers() -> Any:
        return [
            a1111.SchedulerItem(name=s.name, label=s.label, aliases=list(s.aliases) or None)
            for s in samplers.SCHEDULES
        ]

    @app.get("/sdapi/v1/upscalers", tags=["a1111"], response_model=list[a1111.UpscalerItem])
    async def list_upscalers() -> Any:
        return [a1111.UpscalerItem(name=n) for n in UPSCALERS]

    @app.get("/sdapi/v1/progress", tags=["a1111"], response_model=a1111.ProgressResponse)
    async def progress(skip_current_image: bool = False) -> Any:
        current = [pod.running[i] for i in list(pod.a1111_ids) if i in pod.running]
        if not current:
            current = list(pod.running.values())
        if not current:
            return a1111.ProgressResponse(progress=0, eta_relative=0, state=a1111.ProgressState())
        c = current[0]
        elapsed = time.time() - c.started
        eta = elapsed / c.progress - elapsed if c.progress > 0 else 0.0
        state = a1111.ProgressState(
            interrupted=c.cancelled,
            job=c.job_id,
            job_count=c.job_count,
            job_no=c.job_no,
            sampling_step=c.step,
            sampling_steps=c.steps,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.gmtime(c.started)),
        )
        return a1111.ProgressResponse(progress=c.progress, eta_relative=eta, state=state)

    @app.post("/sdapi/v1/png-info", tags=["a1111"], response_model=a1111.PngInfoResponse)
    async def png_info(body: a1111.PngInfoRequest) -> Any:
        from runtime.render import decode_image

        image = decode_image(body.image, "image", settings.max_upscale_pixels)
        text = str(image.info.get(infotext.PNG_TEXT_KEY, ""))
        items = {str(k): v for k, v in image.info.items() if isinstance(v, str)}
        return a1111.PngInfoResponse(
            info=text, items=items, parameters=infotext.parse(text) if text else {}
        )

    @app.post("/sdapi/v1/interrupt", tags=["a1111"])
    async def interrupt() -> None:
        # Only A1111 requests: jobs from the dispatcher are cancelled by id.
        for job_id in list(pod.a1111_ids):
            if job_id in pod.running:
                pod.running[job_id].cancel()

    # Every A1111 route's SdeksError is answered here, in A1111's error shape.
    @app.exception_handler(SdeksError)
    async def sdeks_error(_request: Request, exc: SdeksError) -> JSONResponse:
        return _a1111_error(exc)

    return app


def _a1111_error(exc: SdeksError) -> JSONResponse:
    status = next((s for t, s in _A1111_STATUS.items() if isinstance(exc, t)), 500)
    body = {"error": exc.code, "detail": exc.message, "errors": exc.message}
    return JSONResponse(body, status_code=status)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


async def _build_reporter(settings: RuntimeSettings, stack: AsyncExitStack) -> Reporter:
    """The callback publisher: aiobotocore SNS, plus the task table when configured."""
    from sdeks.aws import aio_client

    assert settings.callback_topic_arn
    sns = await stack.enter_async_context(aio_client("sns"))
    table = None
    if settings.task_table:
        from sdeks.tasks import TaskTable

        dynamodb = await stack.enter_async_context(aio_client("dynamodb"))
        table = TaskTable(dynamodb, settings.task_table, ttl_s=settings.task_ttl_s)
    return Reporter(
        sns, settings.callback_topic_arn, table=table, publish_running=settings.publish_running
    )


def _progress_reporter(
    reporter: Reporter, task_id: str, control: JobControl
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
        pending = asyncio.run_coroutine_threadsafe(reporter.progress(task_id, done, total), loop)

    return report


def _total_steps(content: dict[str, Any]) -> int | None:
    steps, n_iter = content.get("steps", 50), content.get("n_iter", 1)
    if isinstance(steps, int) and isinstance(n_iter, int):
        return steps * n_iter
    return None


def _cancelled_before_start(job: Job, writer: OutputWriter) -> Callback:
    task = job.task
    return Callback.for_task(
        task,
        TaskStatus.CANCELLED,
        output_location=writer.output_location(task),
        error=ErrorInfo(code="cancelled", message="cancel requested before rendering started"),
    )


async def _warm(models: Models, name: str) -> None:
    try:
        future = await asyncio.to_thread(models.prefetch, name)
        timings = await asyncio.wrap_future(future)
        log.info("default model %s warm in %d ms", name, timings.model_load_ms)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a job naming it will fail with the same error, clearly
        log.warning("could not warm the default model %s: %s", name, exc)
