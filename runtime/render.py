"""Render one A1111 txt2img/img2img request with diffusers, as numbered stages.

`Renderer.generate` calls the stages in this order, as diffusers' `__call__` does;
each stage is its own module with a small typed input and output
(`runtime.stages.types`):

1. prepare inputs (`stages.prepare`): check every field, resolve checkpoint,
   sampler, seeds, LoRA and VAE files, init image and mask -> `Plan`.
   Nothing touches a model before this stage has passed.
2. the job's pipeline (`stages.pipeline`): the leased pipeline with this
   request's scheduler, VAE, LoRAs and extra conditioning -> `StageContext`.
3. first pass (`stages.first_pass`): denoise each `n_iter` batch -> `Batch`.
4. hires pass (`runtime.hires`): upscale and denoise again (txt2img `enable_hr`).
5. refiner (`runtime.refiner`): finish the last steps with the refiner checkpoint.
6. post-process (`runtime.postprocess`): the `POST_STAGES` (face restoration,
   ADetailer) rewrite the finished images.
7. encode (`stages.encode`): infotexts and A1111's `info` -> `RenderResult`.

A feature that is off costs one `if` here. Extension points:

- **Post-processing.** A `PostStage` (`check`, `enabled`, `run(images, plan, ctx)`)
  added to `runtime.postprocess.POST_STAGES` runs in stage 6, in list order,
  while the checkpoint is still leased (`ctx.pipe` holds its weights). Its
  `script` names the `alwayson_scripts` key it reads, which stage 1 then
  accepts and `/sdapi/v1/scripts` lists.
- **Extra conditioning of the denoise calls.** A `ConditioningProvider` added to
  `runtime.conditioning.PROVIDERS` turns its `alwayson_scripts` entry into a
  `Conditioning` in stage 1; stage 2 lets it swap in its own pipeline
  (`Conditioning.pipeline`, e.g. a ControlNet pipeline made with `from_pipe`)
  and every pass merges its `call_kwargs` (control images, scales) into each
  pipeline call (`stages.denoise.call`).
- **Infotext fields.** A stage adds them to `Plan.extra_params`.

Errors are `sdeks.errors` instances with stable codes; torch's out-of-memory
becomes `OutOfMemoryError` and the pod keeps serving. Extras
(`/extra-single-image`) live in `runtime.extras`, the upscalers in
`runtime.upscalers`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

from PIL import Image

from runtime import dynamic_prompts, embeddings, hires, prompts, refiner, scripts
from runtime.a1111 import (
    ExtrasBatchImagesRequest,
    ExtrasSingleImageRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
)
from runtime.control import JobControl
from runtime.images import decode_image, encode_png, resize_image
from runtime.models import Models
from runtime.postprocess import run_post_stages
from runtime.settings import RuntimeSettings
from runtime.stages import encode, first_pass
from runtime.stages.encode import VERSION
from runtime.stages.pipeline import JobPipelines, SharedWeightsLock
from runtime.stages.prepare import (
    check_generation,
    check_pinned,
    clip_skip_of,
    effective_settings,
    prepare,
    split_loras,
)
from runtime.stages.types import Loaded, Plan, RenderResult, StageContext
from runtime.upscalers import UPSCALERS
from sdeks.errors import InvalidParameterError, OutOfMemoryError, SdeksError, TaskCancelledError

log = logging.getLogger(__name__)

#: The A1111 options that have an effect here (`/sdapi/v1/options`), with A1111's
#: defaults. Other keys posted to /options are kept and echoed, without effect.
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": None,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
}

__all__ = [
    "DEFAULT_OPTIONS",
    "UPSCALERS",
    "VERSION",
    "JobControl",
    "Loaded",
    "RenderResult",
    "Renderer",
    "SharedWeightsLock",
    "check_generation",
    "clip_skip_of",
    "decode_image",
    "effective_settings",
    "encode_png",
    "resize_image",
    "split_loras",
]


class Renderer:
    """Turns A1111 requests into images on one device. Thread-safe for concurrent jobs."""

    def __init__(self, models: Models, settings: RuntimeSettings) -> None:
        self.models = models
        self.settings = settings
        self.device = models.device
        self._pipelines = JobPipelines(models, settings)
        self._weights = SharedWeightsLock()

    # public entry points -------------------------------------------------

    def txt2img(
        self,
        request: Txt2ImgRequest,
        *,
        options: Mapping[str, Any],
        model: str | None = None,
        control: JobControl | None = None,
    ) -> RenderResult:
        return self.generate(request, None, options=options, model=model, control=control)

    def img2img(
        self,
        request: Img2ImgRequest,
        *,
        options: Mapping[str, Any],
        model: str | None = None,
        control: JobControl | None = None,
    ) -> RenderResult:
        if not request.init_images:
            raise InvalidParameterError("`init_images` must hold at least one image")
        return self.generate(request, request, options=options, model=model, control=control)

    def extras(
        self,
        request: ExtrasSingleImageRequest | ExtrasBatchImagesRequest,
        *,
        options: Mapping[str, Any] | None = None,
        control: JobControl | None = None,
    ) -> RenderResult:
        """`/extra-single-image` and `/extra-batch-images` (`runtime.extras`)."""
        from runtime.extras import render_extras

        check = control.check if control is not None else None
        return render_extras(self.models, self.settings, request, options=options, check=check)

    def check_pinned(self, checkpoint: str) -> None:
        check_pinned(checkpoint, self.models, self.settings)

    # the generation path ----------------------------------------------------

    def generate(
        self,
        request: Txt2ImgRequest | Img2ImgRequest,
        img: Img2ImgRequest | None,
        *,
        options: Mapping[str, Any],
        model: str | None = None,
        control: JobControl | None = None,
    ) -> RenderResult:
        control = control or JobControl(job_id="a1111")
        # A selectable script (`script_name`) runs the render itself, as often as it needs.
        script = scripts.find(request, "img2img" if img is not None else "txt2img")
        if script is not None:
            return script.run(self, request, img, options=options, model=model, control=control)
        # Dynamic Prompts (an alwayson script) expands the templates, then renders each
        # group of images with equal prompts through this method again.
        dynamic = dynamic_prompts.parse_args(request.alwayson_scripts)
        if dynamic is not None:
            return dynamic_prompts.run(
                self, request, img, dynamic, options=options, model=model, control=control
            )

        # 1. Prepare inputs: every field checked and resolved, no model work yet.
        plan = prepare(
            request, img, options=options, model=model, models=self.models, settings=self.settings
        )
        try:
            return self._render(plan, control)
        finally:
            for conditioning in plan.conditioning:
                conditioning.release()  # the weights it pinned in stage 1 (ControlNets)

    def _render(self, plan: Plan, control: JobControl) -> RenderResult:
        """Stages 2-7 for a prepared request."""
        with self._oom_guard(control.job_id), self.models.use(plan.checkpoint, plan.kind) as lease:
            control.check()
            loaded = Loaded.of(lease)
            # LoRAs and tiling change the shared weights: such a render runs alone.
            with self._weights.exclusive() if plan.changes_weights else self._weights.shared():
                # 2. The job's own pipeline: scheduler, VAE, LoRAs, extra conditioning.
                # Undone when the block ends, however it ends (also a failed build).
                with self._pipelines.job(
                    lease.pipeline, loaded, plan, control, getattr(lease, "family", None)
                ) as ctx:
                    # 3.-5. First pass, hires pass, refiner, one n_iter batch at a time.
                    images = self._denoise(plan, ctx)
                    # 6. Post-process (face restoration, ADetailer).
                    images = run_post_stages(images, plan, ctx)

        # 7. Encode: infotexts and the A1111 `info`.
        return encode.result(plan, loaded, images, ctx.lora_note)

    def _denoise(self, plan: Plan, ctx: StageContext) -> list[Image.Image]:
        """Stages 3-5 for every `n_iter` batch; progress counts the steps of every pass."""
        request, control = plan.request, ctx.control
        use_hires, use_refiner = hires.enabled(plan), refiner.enabled(plan)
        control.steps = first_pass.steps(plan) + hires.steps(plan) + refiner.steps(plan)
        control.job_count = request.n_iter
        # A1111 prompt semantics (emphasis, BREAK, no 77-token cut), encoded once per request.
        embeds = prompts.encode(
            ctx.pipe,
            embeddings.convert(ctx.pipe, plan.prompt),
            embeddings.convert(ctx.pipe, plan.negative_prompt),
            plan.clip_skip,
            request.batch_size,
            max_chunks=self.settings.max_prompt_chunks,
        )
        images: list[Image.Image] = []
        for n in range(request.n_iter):
            control.job_no, control.step = n, 0
            try:
                # 3. First pass (left as latents when the hires pass takes latents).
                first_output = hires.first_pass_output(plan) if use_hires else "pil"
                batch = first_pass.run(plan, ctx, n, embeds, output_type=first_output)
                # 4. Hires pass.
                if use_hires:
                    batch = hires.run(plan, ctx, batch, embeds, output_type="pil")
                # 5. Refiner: its UNet took over the last pass's steps from the switch on.
                if use_refiner:
                    batch = refiner.run(plan, ctx, batch)
            except TaskCancelledError:
                if control.keep_partial:  # A1111 /interrupt: keep the finished batches
                    break
                raise
            assert batch.images is not None
            images.extend(batch.images)
        return images

    # kept for the tests and benchmarks that reach the compiled-UNet cache
    def _compiled(self, unet: Any) -> Any:
        return self._pipelines.compiled(unet)

    @contextmanager
    def _oom_guard(self, task_id: str) -> Any:
        import torch

        try:
            yield
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"out of device memory rendering task {task_id}: {exc}"[:400], task_id=task_id
            ) from exc
        except SdeksError:
            raise
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise OutOfMemoryError(
                    f"out of memory rendering task {task_id}: {exc}"[:400], task_id=task_id
                ) from exc
            raise
