"""The pod's HTTP app (FastAPI): builds the shared state and includes one router per API.

    routes.ops     GET /health, /metrics, /v1/state
    routes.jobs    POST /v1/jobs, /v1/jobs/{id}/cancel, /v1/prefetch (the dispatcher's job API)
    routes.sdapi   /sdapi/v1/... (the A1111 API: txt2img, img2img, extra-single-image, ...)
    routes.controlnet  /controlnet/... (the sd-webui-controlnet extension's API)
    routes.adetailer   /adetailer/v1/... (the ADetailer extension's API)

Rendering runs in worker threads (`asyncio.to_thread`) so the event loop keeps
answering `/v1/state`, `/progress` and cancels while a job renders. `slots`
jobs render at once: `/v1/jobs` answers 429 when none is free (the dispatcher
tries another pod); A1111 requests wait their turn as A1111 queues them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from runtime.auth import require_token
from runtime.families import preload_pipeline_classes
from runtime.model_catalog import first_checkpoint
from runtime.models import Models
from runtime.outputs import OutputWriter
from runtime.pod import Pod
from runtime.render import Renderer
from runtime.routes import adetailer, controlnet, jobs, ops, sdapi
from runtime.settings import RuntimeSettings
from sdeks.errors import SdeksError
from sdeks.lifecycle import Reporter

log = logging.getLogger(__name__)

#: The routers, in the order the OpenAPI page lists them.
ROUTERS = (ops.router, jobs.router, sdapi.router, controlnet.router, adetailer.router)


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
    require_token(app, settings.pod_token.get_secret_value() if settings.pod_token else None)
    for router in ROUTERS:
        app.include_router(router)

    # Every route's SdeksError is answered here, in A1111's error shape.
    @app.exception_handler(SdeksError)
    async def sdeks_error(_request: Request, exc: SdeksError) -> JSONResponse:
        return sdapi.a1111_error(exc)

    return app


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
    secret = settings.callback_secret
    return Reporter(
        sns,
        settings.callback_topic_arn,
        table=table,
        publish_running=settings.publish_running,
        signing_secret=secret.get_secret_value() if secret else None,
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
