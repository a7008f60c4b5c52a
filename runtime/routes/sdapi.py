"""A1111's API, `/sdapi/v1/*`: what A1111 clients (webuiapi, bots, UIs) call.

A1111 requests queue for a slot (A1111 renders one at a time); errors are
answered in A1111's shape by the app's `SdeksError` handler (`a1111_error`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse

from runtime import a1111, face_restoration, infotext, samplers, upscalers
from runtime.control import JobControl
from runtime.images import decode_image, encode_png
from runtime.pod import Pod, PodDep
from runtime.stages.types import RenderResult
from sdeks.errors import (
    InvalidParameterError,
    ModelLoadError,
    ModelNotFoundError,
    OutOfMemoryError,
    SdeksError,
    TaskCancelledError,
)

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

_A1111_STATUS = {
    InvalidParameterError: 422,
    ModelNotFoundError: 404,
    ModelLoadError: 500,
    OutOfMemoryError: 507,
    TaskCancelledError: 409,
}


def a1111_error(exc: SdeksError) -> JSONResponse:
    """An error in A1111's shape, with the HTTP status A1111 clients expect."""
    status = next((s for t, s in _A1111_STATUS.items() if isinstance(exc, t)), 500)
    body = {"error": exc.code, "detail": exc.message, "errors": exc.message}
    return JSONResponse(body, status_code=status)


async def _generate(pod: Pod, request: a1111.GenerationRequest, kind: str) -> Any:
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
        return a1111_error(exc)
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
        images=images, parameters=result.parameters, info=json.dumps(result.info, default=str)
    )


@router.post("/txt2img", response_model=a1111.ImageResponse)
async def txt2img(request: a1111.Txt2ImgRequest, pod: PodDep) -> Any:
    return await _generate(pod, request, "txt2img")


@router.post("/img2img", response_model=a1111.ImageResponse)
async def img2img(request: a1111.Img2ImgRequest, pod: PodDep) -> Any:
    return await _generate(pod, request, "img2img")


async def _extras(
    pod: Pod, request: a1111.ExtrasSingleImageRequest | a1111.ExtrasBatchImagesRequest, kind: str
) -> RenderResult | JSONResponse:
    """Extras queue for a slot like renders (an upscale holds the device as long), and
    `/interrupt` stops them between tiles."""
    control = JobControl(job_id=f"a1111-{uuid.uuid4().hex[:12]}")
    options = dict(pod.options)
    pod.a1111_ids.add(control.job_id)
    try:
        result: RenderResult = await pod.run(
            control, lambda: pod.renderer.extras(request, options=options, control=control)
        )
    except SdeksError as exc:
        pod.metrics.jobs.labels("a1111", kind, "failed").inc()
        return a1111_error(exc)
    finally:
        pod.a1111_ids.discard(control.job_id)
    pod.metrics.jobs.labels("a1111", kind, "succeeded").inc()
    pod.metrics.images.labels(kind).inc(len(result.images))
    return result


@router.post("/extra-single-image", response_model=a1111.ExtrasSingleImageResponse)
async def extra_single_image(request: a1111.ExtrasSingleImageRequest, pod: PodDep) -> Any:
    result = await _extras(pod, request, "extra-single-image")
    if isinstance(result, JSONResponse):
        return result
    image = base64.b64encode(encode_png(result.images[0], result.infotexts[0])).decode()
    return a1111.ExtrasSingleImageResponse(html_info=result.infotexts[0], image=image)


@router.post("/extra-batch-images", response_model=a1111.ExtrasBatchImagesResponse)
async def extra_batch_images(request: a1111.ExtrasBatchImagesRequest, pod: PodDep) -> Any:
    result = await _extras(pod, request, "extra-batch-images")
    if isinstance(result, JSONResponse):
        return result
    images = [
        base64.b64encode(encode_png(image, text)).decode()
        for image, text in zip(result.images, result.infotexts, strict=True)
    ]
    return a1111.ExtrasBatchImagesResponse(html_info=result.infotexts[0], images=images)


@router.get("/options")
async def get_options(pod: PodDep) -> dict[str, Any]:
    return dict(pod.options)


@router.post("/options")
async def set_options(pod: PodDep, body: dict[str, Any] = Body(...)) -> Any:  # noqa: B008
    from runtime.options import validate_options

    validate_options(body)  # types and ranges first: a refused call changes nothing
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is not None:
        # A1111 loads the model when it is set; an unknown one is refused.
        await asyncio.to_thread(pod.renderer.check_pinned, checkpoint)
        await asyncio.to_thread(pod.models.load, checkpoint)
    if "CLIP_stop_at_last_layers" in body:
        await asyncio.to_thread(_check_clip_layers, pod, body, checkpoint)
    if not a1111.is_no_vae(body.get("sd_vae")):
        await asyncio.to_thread(pod.models.fetch_vae, str(body["sd_vae"]))
    pod.options.update(body)
    return None


@router.get("/sd-models", response_model=list[a1111.SDModelItem])
async def sd_models(pod: PodDep) -> Any:
    return [a1111.SDModelItem(**m) for m in await asyncio.to_thread(pod.models.sd_models)]


@router.get("/sd-vae", response_model=list[a1111.SDVaeItem])
async def sd_vae(pod: PodDep) -> Any:
    vaes = await asyncio.to_thread(pod.models.vaes)
    return [a1111.SDVaeItem(model_name=v.model_name, filename=v.key) for v in vaes]


@router.get("/loras", response_model=list[a1111.LoraItem])
async def loras(pod: PodDep) -> Any:
    found = await asyncio.to_thread(pod.models.loras)
    return [a1111.LoraItem(name=v.model_name, alias=v.model_name, path=v.key) for v in found]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(pod: PodDep) -> None:
    await asyncio.to_thread(pod.models.refresh)


@router.get("/samplers", response_model=list[a1111.SamplerItem])
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


@router.get("/schedulers", response_model=list[a1111.SchedulerItem])
async def list_schedulers() -> Any:
    return [
        a1111.SchedulerItem(name=s.name, label=s.label, aliases=list(s.aliases) or None)
        for s in samplers.SCHEDULES
    ]


@router.get("/upscalers", response_model=list[a1111.UpscalerItem])
async def list_upscalers(pod: PodDep) -> Any:
    found = await asyncio.to_thread(upscalers.items, pod.models)
    return [a1111.UpscalerItem(**item) for item in found]


@router.get("/face-restorers", response_model=list[a1111.FaceRestorerItem])
async def list_face_restorers(pod: PodDep) -> Any:
    found = await asyncio.to_thread(face_restoration.items, pod.models)
    return [a1111.FaceRestorerItem(**item) for item in found]


@router.get("/scripts", response_model=a1111.ScriptsList)
async def list_scripts() -> Any:
    from runtime import scripts

    return a1111.ScriptsList(**scripts.listing())


@router.get("/prompt-styles", response_model=list[a1111.PromptStyleItem])
async def prompt_styles(pod: PodDep) -> Any:
    from runtime import styles

    found = await asyncio.to_thread(styles.load, pod.models)
    return [
        a1111.PromptStyleItem(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt)
        for s in found.values()
    ]


@router.get("/embeddings")
async def list_embeddings(pod: PodDep) -> Any:
    from runtime import embeddings

    return await asyncio.to_thread(embeddings.listing, pod.models)


@router.get("/latent-upscale-modes", response_model=list[a1111.LatentUpscalerModeItem])
async def latent_upscale_modes() -> Any:
    from runtime.hires import LATENT_UPSCALE_MODES

    return [a1111.LatentUpscalerModeItem(name=name) for name in LATENT_UPSCALE_MODES]


@router.get("/progress", response_model=a1111.ProgressResponse)
async def progress(pod: PodDep, skip_current_image: bool = False) -> Any:
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


@router.post("/png-info", response_model=a1111.PngInfoResponse)
async def png_info(body: a1111.PngInfoRequest, pod: PodDep) -> Any:
    image = decode_image(body.image, "image", pod.settings.max_upscale_pixels)
    text = str(image.info.get(infotext.PNG_TEXT_KEY, ""))
    items = {str(k): v for k, v in image.info.items() if isinstance(v, str)}
    return a1111.PngInfoResponse(
        info=text, items=items, parameters=infotext.parse(text) if text else {}
    )


@router.post("/interrupt")
async def interrupt(pod: PodDep) -> None:
    # Only A1111 requests: jobs from the dispatcher are cancelled by id.
    for job_id in list(pod.a1111_ids):
        if job_id in pod.running:
            pod.running[job_id].cancel()


def _check_clip_layers(pod: Any, body: dict[str, Any], checkpoint: str | None) -> None:
    """`CLIP_stop_at_last_layers` against the depth of the model it will apply to."""
    from runtime.options import clip_layers, encoder_layers

    name = checkpoint or pod.options.get("sd_model_checkpoint") or pod.settings.default_model
    if not name:
        return
    with pod.models.use(name) as lease:
        clip_layers(body["CLIP_stop_at_last_layers"], encoder_layers(lease.pipeline))
