"""Render one A1111 request with diffusers: text-to-image, image-to-image (inpaint), upscale.

`Renderer.render` reads top to bottom as the steps of a job:

1. check inputs (no GPU work before every field is known to be usable)
2. resolve settings: checkpoint, VAE, clip skip, sampler, seeds
3. load the model (through the `ModelSource`)
4. build the job's own pipeline (its scheduler, VAE, LoRAs)
5. denoise, one `n_iter` batch at a time, each image from its own seed
6. infotexts and the A1111 `info`

Errors are `sdeks.errors` instances with stable codes; torch's out-of-memory
becomes `OutOfMemoryError` and the pod keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from runtime import infotext, prompts, samplers, seeds
from runtime.a1111 import (
    NO_VAE,
    ExtrasSingleImageRequest,
    GenerationRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
)
from runtime.models import Models, PipelineKind
from runtime.settings import RuntimeSettings
from sdeks.errors import (
    InvalidParameterError,
    ModelNotFoundError,
    OutOfMemoryError,
    SdeksError,
    TaskCancelledError,
)

log = logging.getLogger(__name__)

VERSION = "sdeks-runtime"
#: `alwayson_scripts` this runtime runs (lower-cased: A1111 matches titles case-insensitively).
SUPPORTED_SCRIPTS = frozenset({"controlnet"})
#: Device bytes for loaded ControlNet models (LRU beyond that).
CONTROLNET_CACHE_BYTES = 8 * 2**30
UPSCALERS = ("None", "Lanczos", "Nearest")
_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
_LORA_RE = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?(?::[^>]*)?>")

#: The A1111 options that have an effect here (`/sdapi/v1/options`), with A1111's
#: defaults. Other keys posted to /options are kept and echoed, without effect.
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": None,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
}


@dataclass
class JobControl:
    """Progress and cancellation of one running job, shared with the HTTP side."""

    job_id: str
    cancel_event: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    steps: int = 0
    job_no: int = 0
    job_count: int = 1
    started: float = field(default_factory=time.time)
    #: A1111 `/interrupt` semantics: keep the images finished so far instead of failing.
    keep_partial: bool = False
    #: Called after every denoising step with (steps done, steps in all), from the render thread.
    on_progress: Callable[[int, int], None] | None = None

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def progress(self) -> float:
        if self.steps <= 0:
            return 0.0
        done = self.job_no * self.steps + self.step
        return min(1.0, done / (self.steps * max(self.job_count, 1)))

    def check(self) -> None:
        if self.cancelled:
            raise TaskCancelledError(f"task {self.job_id} was cancelled", task_id=self.job_id)


@dataclass(frozen=True)
class Loaded:
    """What the results say about the model a render used (from the store's lease)."""

    #: The store's name for the checkpoint (`sub/foo.safetensors`, `bar`): unlike
    #: `title`, it stays the same once the hash becomes known.
    name: str
    title: str
    model_name: str
    hash: str | None
    load_ms: int
    inpainting_unet: bool

    @classmethod
    def of(cls, lease: Any) -> Loaded:
        name = lease.name
        for suffix in (".safetensors", ".ckpt"):
            name = name.removesuffix(suffix)
        unet = getattr(lease.pipeline, "unet", None)
        return cls(
            name=lease.name,
            title=lease.title,
            model_name=name,
            hash=lease.hash,
            load_ms=lease.timings.model_load_ms,
            inpainting_unet=bool(unet is not None and unet.config.in_channels == 9),
        )


class SharedWeightsLock:
    """Readers-writer lock over the shared model weights.

    Plain renders share them; a render with prompt LoRAs injects adapters into
    the shared UNet/text encoder (diffusers `load_lora_weights`), so it waits
    for the others and runs alone until the LoRAs are unloaded again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class RenderResult:
    images: list[Image.Image]
    infotexts: list[str]
    info: dict[str, Any]
    parameters: dict[str, Any]
    seeds: list[int] = field(default_factory=list)
    model: str | None = None
    model_load_ms: int = 0
    inference_ms: int = 0


# --- pure helpers ------------------------------------------------------------


def decode_image(data: str, field_name: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a `data:` URL) as RGB, refusing bombs and garbage."""
    if not isinstance(data, str) or not data:
        raise InvalidParameterError(f"`{field_name}` must be a base64 image, got nothing")
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=False)
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > max_pixels:
            raise InvalidParameterError(
                f"`{field_name}` is {image.width}x{image.height}, over the limit of "
                f"{max_pixels} pixels"
            )
        image.load()
    except InvalidParameterError:
        raise
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidParameterError(
            f"`{field_name}` is not a decodable image ({type(exc).__name__}: {exc})"[:300]
        ) from exc
    return ImageOps.exif_transpose(image)


def encode_png(image: Image.Image, parameters: str | None = None) -> bytes:
    """PNG bytes with the A1111 `parameters` tEXt chunk."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    if parameters:
        meta.add_text(infotext.PNG_TEXT_KEY, parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def resize_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111 `images.resize_image`: 0 stretch, 1 crop to fill, 2 fit and fill, 3 = 0."""
    lanczos = Image.Resampling.LANCZOS
    if mode == 1:
        return ImageOps.fit(image, (width, height), lanczos)
    if mode == 2:
        # A1111 fills the borders by stretching the edge; a stretched copy behind is close.
        canvas = image.resize((width, height), lanczos).filter(ImageFilter.GaussianBlur(8))
        fitted = ImageOps.contain(image, (width, height), lanczos)
        canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
        return canvas
    return image.resize((width, height), lanczos)


def split_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`<lora:name:weight>` tags out of the prompt: (clean prompt, [(name, weight)])."""
    loras: list[tuple[str, float]] = []
    for match in _LORA_RE.finditer(prompt):
        name, weight = match.group(1).strip(), match.group(2)
        try:
            value = float(weight) if weight is not None else 1.0
        except ValueError as exc:
            raise InvalidParameterError(
                f"`prompt` LoRA {match.group(0)!r} has a weight that is not a number"
            ) from exc
        loras.append((name, value))
    return _LORA_RE.sub("", prompt).strip(), loras


def effective_settings(
    options: Mapping[str, Any], request: GenerationRequest | None
) -> dict[str, Any]:
    """The A1111 options in force for one request: persisted options + override_settings."""
    merged = dict(options)
    if request is not None and request.override_settings:
        merged.update(request.override_settings)
    return merged


def check_generation(request: GenerationRequest, settings: RuntimeSettings) -> None:
    """Refuse impossible or oversized requests before any model work (diffusers' check_inputs)."""
    for name in ("width", "height"):
        value = getattr(request, name)
        if value <= 0 or value % 8:
            raise InvalidParameterError(f"`{name}` must be a positive multiple of 8, got {value}")
    if request.width * request.height > settings.max_pixels:
        raise InvalidParameterError(
            f"`width` x `height` is {request.width}x{request.height} = "
            f"{request.width * request.height} pixels, over the limit of {settings.max_pixels}"
        )
    if not 1 <= request.steps <= settings.max_steps:
        raise InvalidParameterError(
            f"`steps` must be between 1 and {settings.max_steps}, got {request.steps}"
        )
    if not 1 <= request.batch_size <= settings.max_batch_size:
        raise InvalidParameterError(
            f"`batch_size` must be between 1 and {settings.max_batch_size}, got {request.batch_size}"
        )
    if request.n_iter < 1:
        raise InvalidParameterError(f"`n_iter` must be at least 1, got {request.n_iter}")
    if request.batch_size * request.n_iter > settings.max_images:
        raise InvalidParameterError(
            f"`batch_size` x `n_iter` is {request.batch_size}x{request.n_iter}, over the limit "
            f"of {settings.max_images} images"
        )
    if not math.isfinite(request.cfg_scale) or not 0 <= request.cfg_scale <= 100:
        raise InvalidParameterError(
            f"`cfg_scale` must be between 0 and 100, got {request.cfg_scale}"
        )
    strength = request.denoising_strength
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise InvalidParameterError(f"`denoising_strength` must be between 0 and 1, got {strength}")
    if request.enable_hr if isinstance(request, Txt2ImgRequest) else False:
        raise InvalidParameterError("`enable_hr` (hires fix) is not supported by this runtime")
    for name in ("restore_faces", "tiling"):
        if getattr(request, name):
            raise InvalidParameterError(f"`{name}` is not supported by this runtime, got true")
    if request.refiner_checkpoint:
        raise InvalidParameterError(
            f"`refiner_checkpoint` {request.refiner_checkpoint!r}: refiners are not supported "
            "by this runtime"
        )
    if request.script_name:
        raise InvalidParameterError(
            f"`script_name` {request.script_name!r}: scripts are not supported by this runtime"
        )
    unsupported = sorted(k for k in request.script_alwayson if k.lower() not in SUPPORTED_SCRIPTS)
    if unsupported:
        raise InvalidParameterError(
            f"`alwayson_scripts` {unsupported}: scripts are not supported by this runtime "
            f"(supported: {', '.join(sorted(SUPPORTED_SCRIPTS))} and the routing key "
            "sd_model_checkpoint)"
        )


def clip_skip_of(value: Any) -> int | None:
    """A1111 `CLIP_stop_at_last_layers` (1 = last layer) -> diffusers `clip_skip` (layers skipped)."""
    try:
        layers = int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(
            f"`CLIP_stop_at_last_layers` must be an integer, got {value!r}"
        ) from exc
    if not 1 <= layers <= 12:
        raise InvalidParameterError(f"`CLIP_stop_at_last_layers` must be 1..12, got {layers}")
    return layers - 1 or None


# --- the renderer ------------------------------------------------------------


class Renderer:
    """Turns A1111 requests into images on one device. Thread-safe for concurrent jobs."""

    def __init__(self, models: Models, settings: RuntimeSettings) -> None:
        self.models = models
        self.settings = settings
        self.device = models.device
        self._vae_cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._weights = SharedWeightsLock()
        self._compiled_unets: dict[int, tuple[Any, Any]] = {}
        self._controlnets: Any = None
        self._annotators: Any = None

    # public entry points -------------------------------------------------

    def txt2img(
        self,
        request: Txt2ImgRequest,
        *,
        options: Mapping[str, Any],
        model: str | None = None,
        control: JobControl | None = None,
    ) -> RenderResult:
        return self._generate(request, None, options=options, model=model, control=control)

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
        return self._generate(request, request, options=options, model=model, control=control)

    def extras(self, request: ExtrasSingleImageRequest) -> RenderResult:
        """`/extra-single-image`: resize with the built-in upscalers (no model needed)."""
        for name in ("upscaler_1", "upscaler_2"):
            value = getattr(request, name)
            if value not in UPSCALERS:
                raise InvalidParameterError(
                    f"`{name}` {value!r} is not installed; available upscalers: "
                    f"{', '.join(UPSCALERS)}"
                )
        image = decode_image(request.image, "image", self.settings.max_upscale_pixels).convert(
            "RGB"
        )
        if request.resize_mode == 1:
            width, height = request.upscaling_resize_w, request.upscaling_resize_h
            scale_text = f"{width}x{height}"
        else:
            if not 0 < request.upscaling_resize <= 8:
                raise InvalidParameterError(
                    f"`upscaling_resize` must be between 0 and 8, got {request.upscaling_resize}"
                )
            width = round(image.width * request.upscaling_resize)
            height = round(image.height * request.upscaling_resize)
            scale_text = f"{request.upscaling_resize:g}"
        if width < 1 or height < 1 or width * height > self.settings.max_upscale_pixels:
            raise InvalidParameterError(
                f"upscaled size {width}x{height} is outside 1..{self.settings.max_upscale_pixels} "
                "pixels"
            )
        start = time.perf_counter()
        result = self._upscale(image, request.upscaler_1, width, height, request)
        if request.upscaler_2 != "None" and request.extras_upscaler_2_visibility > 0:
            second = self._upscale(image, request.upscaler_2, width, height, request)
            result = Image.blend(result, second, min(1.0, request.extras_upscaler_2_visibility))
        params = {"Postprocess upscale by": scale_text, "Postprocess upscaler": request.upscaler_1}
        if request.upscaler_2 != "None":
            params["Postprocess upscaler 2"] = request.upscaler_2
        text = ", ".join(f"{k}: {v}" for k, v in params.items())
        return RenderResult(
            images=[result],
            infotexts=[text],
            info={"html_info": text, "width": width, "height": height, "infotexts": [text]},
            parameters=request.model_dump(exclude={"image"}),
            inference_ms=int((time.perf_counter() - start) * 1000),
        )

    def _upscale(
        self, image: Image.Image, upscaler: str, width: int, height: int, req: Any
    ) -> Image.Image:
        resample = _RESAMPLE.get(upscaler, Image.Resampling.LANCZOS)
        if req.resize_mode == 1 and req.upscaling_crop:
            return ImageOps.fit(image, (width, height), resample)
        return image.resize((width, height), resample)

    # the generation path ----------------------------------------------------

    def _generate(
        self,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        *,
        options: Mapping[str, Any],
        model: str | None,
        control: JobControl | None,
    ) -> RenderResult:
        control = control or JobControl(job_id="a1111")

        # 1. Check inputs.
        check_generation(request, self.settings)
        named = request.requested_checkpoint()
        choice = samplers.resolve(request.sampler, request.scheduler)
        count = request.batch_size * request.n_iter
        plan = seeds.plan_seeds(request.seed, request.subseed, request.subseed_strength, count)
        init_image, mask = self._prepare_images(img, request) if img else (None, None)
        if mask is not None and plan.subseed_strength > 0:
            raise InvalidParameterError(
                "`subseed_strength` (variation seeds) is not supported together with `mask`"
            )
        prompt, loras = split_loras(request.prompt)
        if request.disable_extra_networks:
            loras = []

        # 2. Resolve the settings in force (override_settings apply to this request only).
        opts = effective_settings(options, request)
        # DESIGN.md: the model the dispatcher scheduled, the one the request names,
        # then the persisted /options value, then the pod's default.
        checkpoint = (
            model or named or options.get("sd_model_checkpoint") or self.settings.default_model
        )
        if not checkpoint:
            raise ModelNotFoundError(
                "no checkpoint named (alwayson_scripts/override_settings.sd_model_checkpoint) "
                "and the runtime has no default model (SDEKS_DEFAULT_MODEL)"
            )
        self._check_pinned(str(checkpoint))
        clip_skip = clip_skip_of(opts.get("CLIP_stop_at_last_layers", 1))
        vae_name = str(opts.get("sd_vae") or "Automatic")
        # LoRA and VAE files first: a missing one fails before the checkpoint is loaded.
        lora_files = [(name, self.models.fetch_lora(name), weight) for name, weight in loras]
        if vae_name not in NO_VAE:
            self.models.fetch_vae(vae_name)

        kind: PipelineKind = (
            "inpaint" if mask is not None else ("img2img" if init_image is not None else "txt2img")
        )
        # ControlNet units: checked, preprocessed and their models loaded before the checkpoint.
        conditioning = self._controlnet(request, kind, init_image, mask)
        try:
            images, infotexts, loaded = self._load_and_denoise(
                request,
                img,
                checkpoint=str(checkpoint),
                kind=kind,
                prompt=prompt,
                plan=plan,
                choice=choice,
                clip_skip=clip_skip,
                init_image=init_image,
                mask=mask,
                control=control,
                vae_name=vae_name,
                loras=loras,
                lora_files=lora_files,
                conditioning=conditioning,
            )
        finally:
            if conditioning is not None:
                conditioning.release()
        extra = conditioning.extra_params if conditioning is not None else {}

        # 6. The A1111 `info`.
        info = self._info(request, img, plan, choice, loaded, vae_name, clip_skip, infotexts)
        info["extra_generation_params"] = dict(extra)
        return RenderResult(
            images=images,
            infotexts=infotexts,
            info=info,
            parameters=_parameters(request),
            seeds=plan.all_seeds[: len(images)],
            model=loaded.title,
            model_load_ms=loaded.load_ms,
        )

    def _controlnet(
        self,
        request: GenerationRequest,
        kind: str,
        init_image: Image.Image | None,
        mask: Image.Image | None,
    ) -> Any:
        """The request's ControlNet conditioning, or None (no unit, or none active)."""
        from runtime import controlnet, controlnet_units

        if controlnet_units.script_args(request.alwayson_scripts, controlnet_units.SCRIPT) is None:
            return None
        with self._lock:
            if self._controlnets is None:
                from runtime.preprocessors import Annotators

                self._controlnets = controlnet.ControlNetCache(
                    self.models,
                    budget_bytes=CONTROLNET_CACHE_BYTES,
                    work_dir=Path(self.settings.cache_dir) / "controlnet-configs",
                )
                self._annotators = Annotators(self.models.fetch_file, self.device)
        limit = self.settings.max_upscale_pixels
        return controlnet.build_conditioning(
            request.alwayson_scripts,
            kind=kind,
            width=request.width,
            height=request.height,
            cfg_scale=request.cfg_scale,
            init_image=init_image,
            mask=mask,
            cache=self._controlnets,
            annotators=self._annotators,
            decode=lambda data, where: decode_image(data, where, limit),
        )

    def _load_and_denoise(
        self,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        *,
        checkpoint: str,
        kind: PipelineKind,
        prompt: str,
        plan: seeds.SeedPlan,
        choice: samplers.SamplerChoice,
        clip_skip: int | None,
        init_image: Image.Image | None,
        mask: Image.Image | None,
        control: JobControl,
        vae_name: str,
        loras: list[tuple[str, float]],
        lora_files: list[tuple[str, Path, float]],
        conditioning: Any,
    ) -> tuple[list[Image.Image], list[str], Loaded]:
        # 3. Load the model: pinned in the store for the whole render, as a pipeline of our kind.
        with self._oom_guard(control.job_id), self.models.use(checkpoint, kind) as lease:
            control.check()
            loaded = Loaded.of(lease)
            # LoRAs are injected into the shared weights: such a render runs alone.
            with self._weights.exclusive() if loras else self._weights.shared():
                # 4. The job's own pipeline: scheduler, VAE, LoRAs.
                pipe = self._job_pipeline(lease.pipeline, loaded, choice, vae_name)
                if conditioning is not None:
                    pipe = conditioning.pipeline(pipe)
                try:
                    lora_note = self._apply_loras(pipe, lora_files)
                    # 5. Denoise.
                    images, infotexts = self._denoise(
                        pipe,
                        request,
                        img,
                        prompt=prompt,
                        plan=plan,
                        choice=choice,
                        clip_skip=clip_skip,
                        init_image=init_image,
                        mask=mask,
                        control=control,
                        loaded=loaded,
                        vae_name=vae_name,
                        lora_note=lora_note,
                        conditioning=conditioning,
                    )
                finally:
                    if loras:
                        pipe.unload_lora_weights()
        return images, infotexts, loaded

    def check_pinned(self, checkpoint: str) -> None:
        self._check_pinned(checkpoint)

    def _check_pinned(self, checkpoint: str) -> None:
        """With dynamic models off, only the default checkpoint (under any A1111 name)."""
        default = self.settings.default_model
        if self.settings.dynamic_models or not default or checkpoint == default:
            return
        if self.models.resolve(checkpoint).key != self.models.resolve(default).key:
            raise InvalidParameterError(
                f"`sd_model_checkpoint` {checkpoint!r}: runtime {self.settings.runtime!r} serves "
                f"only its default model {default!r} (dynamic models are off)"
            )

    def _prepare_images(
        self, img: Img2ImgRequest, request: GenerationRequest
    ) -> tuple[Image.Image, Image.Image | None]:
        limit = self.settings.max_upscale_pixels
        assert img.init_images
        images = [
            decode_image(data, f"init_images[{i}]", limit) for i, data in enumerate(img.init_images)
        ]
        init = resize_image(
            images[0].convert("RGB"), img.resize_mode, request.width, request.height
        )
        if img.mask is None:
            return init, None
        mask = decode_image(img.mask, "mask", limit).convert("L")
        mask = resize_image(mask, img.resize_mode, request.width, request.height)
        if img.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        blur = img.mask_blur if img.mask_blur is not None else max(img.mask_blur_x, img.mask_blur_y)
        if blur > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        init = _fill_masked(init, mask, img.inpainting_fill)
        return init, mask

    def _job_pipeline(self, pipe: Any, loaded: Loaded, choice: Any, vae_name: str) -> Any:
        """The lease's pipeline (already this job's own object) with our scheduler and VAE."""
        from runtime.families import diffusers_attr

        scheduler_cls = diffusers_attr(choice.scheduler_class)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **choice.scheduler_kwargs)
        pipe.set_progress_bar_config(disable=True)
        if self.settings.compile and self.device.startswith("cuda"):
            pipe.unet = self._compiled(pipe.unet)
        vae = self._vae(pipe, loaded, vae_name)
        if vae is not None:
            pipe.vae = vae
        return pipe

    def _compiled(self, unet: Any) -> Any:
        """`torch.compile` of a (shared) UNet, once per UNet: the first render pays the
        compile, later ones of the same shapes run the compiled graph."""
        import torch

        with self._lock:
            compiled = self._compiled_unets.get(id(unet))
            if compiled is None or compiled[0] is not unet:
                compiled = (unet, torch.compile(unet, mode="max-autotune-no-cudagraphs"))
                self._compiled_unets[id(unet)] = compiled
            return compiled[1]

    def _vae(self, pipe: Any, loaded: Loaded, vae_name: str) -> Any:
        """`sd_vae`: "Automatic"/"None" keep the checkpoint's VAE; a name loads `VAE/<name>`."""
        if vae_name in NO_VAE:
            return None
        # Keyed by the checkpoint's name: its title gains ` [hash]` once the hash is
        # known, which would load the same VAE again.
        key = (loaded.name, vae_name)
        with self._lock:
            if key in self._vae_cache:
                return self._vae_cache[key]
        path = self.models.fetch_vae(vae_name)
        from runtime.vae import load_vae

        vae = load_vae(path, pipe.vae, self.device)
        with self._lock:
            self._vae_cache[key] = vae
        return vae

    def _apply_loras(self, pipe: Any, loras: list[tuple[str, Path, float]]) -> str | None:
        if not loras:
            return None
        names = []
        for i, (name, path, _weight) in enumerate(loras):
            adapter = f"lora{i}"
            try:
                pipe.load_lora_weights(str(path), adapter_name=adapter)
            except Exception as exc:
                raise InvalidParameterError(
                    f"`prompt` LoRA {name!r} could not be loaded: {exc}"[:400]
                ) from exc
            names.append(adapter)
        pipe.set_adapters(names, adapter_weights=[w for _, _, w in loras])
        return ", ".join(f"{n}: {w:g}" for n, _, w in loras)

    def _denoise(
        self,
        pipe: Any,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        *,
        prompt: str,
        plan: seeds.SeedPlan,
        choice: samplers.SamplerChoice,
        clip_skip: int | None,
        init_image: Image.Image | None,
        mask: Image.Image | None,
        control: JobControl,
        loaded: Loaded,
        vae_name: str,
        lora_note: str | None,
        conditioning: Any = None,
    ) -> tuple[list[Image.Image], list[str]]:
        import torch

        batch = request.batch_size
        strength = request.denoising_strength if request.denoising_strength is not None else 0.75
        steps_run = request.steps if img is None else max(1, int(request.steps * strength))
        control.steps, control.job_count = steps_run, request.n_iter

        def on_step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            control.step = i + 1
            if control.on_progress is not None:
                total = control.steps * control.job_count
                control.on_progress(control.job_no * control.steps + control.step, total)
            control.check()  # raising here stops the pipeline between steps
            return kwargs

        images: list[Image.Image] = []
        infotexts: list[str] = []
        extra = conditioning.extra_params if conditioning is not None else {}
        latent_shape = (
            pipe.vae.config.latent_channels,  # 4; an inpainting UNet takes 9 but denoises 4
            request.height // pipe.vae_scale_factor,
            request.width // pipe.vae_scale_factor,
        )
        # A1111 prompt semantics (emphasis, BREAK, no 77-token cut), encoded once per request.
        embeds = prompts.encode(pipe, prompt, request.negative_prompt, clip_skip, batch)
        for n in range(request.n_iter):
            control.job_no, control.step = n, 0
            idx = range(n * batch, (n + 1) * batch)
            batch_seeds = [plan.all_seeds[i] for i in idx]
            if choice.sampler.brownian:
                # DPMSolverSDEScheduler draws Brownian noise from its own seed(s), one tree per image.
                pipe.scheduler = type(pipe.scheduler).from_config(
                    pipe.scheduler.config, noise_sampler_seed=batch_seeds
                )
            noise = torch.stack(
                [
                    seeds.image_noise(
                        plan.all_seeds[i], plan.all_subseeds[i], plan.subseed_strength, latent_shape
                    )
                    for i in idx
                ]
            )
            kwargs: dict[str, Any] = {
                **embeds,
                "num_inference_steps": request.steps,
                "guidance_scale": request.cfg_scale,
                "generator": [seeds.generator(s) for s in batch_seeds],
                "callback_on_step_end": on_step_end,
                "output_type": "pil",
            }
            if request.eta is not None:
                kwargs["eta"] = request.eta
            if conditioning is not None:
                kwargs.update(conditioning.call_kwargs(width=request.width, height=request.height))
            if init_image is not None and strength == 0:
                # Nothing to denoise (diffusers refuses zero steps): the init image is the result.
                out = [init_image.copy() for _ in idx]
                images.extend(out)
                infotexts.extend(
                    self._infotext(
                        request, img, plan, choice, loaded, vae_name, clip_skip, i, lora_note, extra
                    )
                    for i in idx
                )
                continue
            if init_image is not None and int(request.steps * strength) < 1:
                # A1111 runs int(steps * strength) steps; diffusers needs at least one.
                kwargs["num_inference_steps"] = math.ceil(1 / strength)
            if mask is not None:
                assert img is not None
                kwargs.update(image=init_image, mask_image=mask, strength=strength)
                kwargs.update(height=request.height, width=request.width)
                if img.inpaint_full_res and conditioning is None:
                    # A1111 "only masked": inpaint the mask's bounding box (plus padding)
                    # at full resolution and paste it back; diffusers' padding_mask_crop.
                    # diffusers' ControlNet inpaint cannot crop several control images, so
                    # with ControlNet units the whole picture is inpainted.
                    kwargs["padding_mask_crop"] = img.inpaint_full_res_padding
            elif init_image is not None:
                kwargs.update(image=self._encode(pipe, init_image, batch), strength=strength)
                _inject_noise(pipe, noise)
            else:
                kwargs.update(
                    height=request.height,
                    width=request.width,
                    latents=noise.to(self.device, pipe.unet.dtype),
                )
            try:
                with torch.inference_mode(), self._vae_tiling(pipe, request):
                    out = pipe(**kwargs).images
            except TaskCancelledError:
                if control.keep_partial:
                    break
                raise
            for j, image in enumerate(out):
                i = n * batch + j
                images.append(image)
                infotexts.append(
                    self._infotext(
                        request, img, plan, choice, loaded, vae_name, clip_skip, i, lora_note, extra
                    )
                )
        return images, infotexts

    def _encode(self, pipe: Any, image: Image.Image, batch: int) -> Any:
        """Init image -> scaled VAE latents (the distribution's mean: no RNG spent on it)."""
        import torch

        vae = pipe.vae
        dtype = vae.dtype
        # SDXL's VAE overflows in fp16 (`force_upcast`); diffusers' own encode/decode
        # upcast it for the call and cast it back, and so do we.
        upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        pixels = pipe.image_processor.preprocess(image).to(self.device)
        with torch.inference_mode():
            if upcast:
                vae.to(dtype=torch.float32)
            try:
                moments = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
            finally:
                if upcast:
                    vae.to(dtype=dtype)
            latents = (moments * vae.config.scaling_factor).to(dtype)
        return latents.repeat(batch, 1, 1, 1)

    @contextmanager
    def _vae_tiling(self, pipe: Any, request: GenerationRequest) -> Any:
        tile = request.width * request.height > self.settings.vae_tiling_pixels
        if tile and hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_tiling"):
            pipe.vae.enable_tiling()
            try:
                yield
            finally:
                pipe.vae.disable_tiling()
        else:
            yield

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

    # A1111 results ------------------------------------------------------------

    def _infotext(
        self,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        plan: seeds.SeedPlan,
        choice: samplers.SamplerChoice,
        loaded: Loaded,
        vae_name: str,
        clip_skip: int | None,
        i: int,
        lora_note: str | None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        varies = plan.subseed_strength > 0
        strength = request.denoising_strength
        if img is not None and strength is None:
            strength = 0.75
        params: dict[str, Any] = {
            "Steps": request.steps,
            "Sampler": choice.sampler.name,
            "Schedule type": choice.schedule_label,
            "CFG scale": request.cfg_scale,
            "Seed": plan.all_seeds[i],
            "Size": f"{request.width}x{request.height}",
            "Model hash": loaded.hash,
            "Model": loaded.model_name,
            "VAE": vae_name if vae_name not in NO_VAE else None,
            "Variation seed": plan.all_subseeds[i] if varies else None,
            "Variation seed strength": plan.subseed_strength if varies else None,
            "Denoising strength": strength if img is not None else None,
            "Mask blur": _mask_blur(img) if img is not None and img.mask else None,
            "Clip skip": clip_skip + 1 if clip_skip else None,
            "Lora hashes": f'"{lora_note}"' if lora_note else None,
            **(extra or {}),
            "Version": VERSION,
        }
        prompt = request.prompt
        return infotext.format_infotext(prompt, request.negative_prompt, params)

    def _info(
        self,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        plan: seeds.SeedPlan,
        choice: samplers.SamplerChoice,
        loaded: Loaded,
        vae_name: str,
        clip_skip: int | None,
        infotexts: list[str],
    ) -> dict[str, Any]:
        count = len(infotexts)
        strength = request.denoising_strength
        if img is not None and strength is None:
            strength = 0.75
        return {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * count,
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * count,
            "seed": plan.seed,
            "all_seeds": plan.all_seeds[:count],
            "subseed": plan.subseed,
            "all_subseeds": plan.all_subseeds[:count],
            "subseed_strength": plan.subseed_strength,
            "width": request.width,
            "height": request.height,
            "sampler_name": choice.sampler.name,
            "scheduler": choice.schedule_label,
            "cfg_scale": request.cfg_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "n_iter": request.n_iter,
            "restore_faces": bool(request.restore_faces),
            "face_restoration_model": None,
            "sd_model_name": loaded.model_name,
            "sd_model_hash": loaded.hash,
            "sd_vae_name": vae_name if vae_name not in NO_VAE else None,
            "sd_vae_hash": None,
            "seed_resize_from_w": request.seed_resize_from_w,
            "seed_resize_from_h": request.seed_resize_from_h,
            "denoising_strength": strength if strength is not None else 0,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": request.styles or [],
            "job_timestamp": datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
            "clip_skip": (clip_skip or 0) + 1,
            "is_using_inpainting_conditioning": bool(img is not None and img.mask)
            and loaded.inpainting_unet,
            "version": VERSION,
        }


def _mask_blur(img: Img2ImgRequest) -> int:
    return img.mask_blur if img.mask_blur is not None else max(img.mask_blur_x, img.mask_blur_y)


def _parameters(request: GenerationRequest) -> dict[str, Any]:
    """The request as A1111 echoes it, without the (large) images."""
    return request.model_dump(exclude={"init_images", "mask"})


def _fill_masked(image: Image.Image, mask: Image.Image, mode: int) -> Image.Image:
    """A1111 `inpainting_fill` before denoising: 0 fill, 1 original, 2 noise, 3 nothing."""
    if mode == 1:
        return image
    if mode == 0:
        # A1111 fills with the image's colours smeared across the hole.
        filler = image.filter(ImageFilter.GaussianBlur(max(image.size) // 8 or 1))
    elif mode == 2:
        filler = Image.effect_noise(image.size, 64).convert("RGB")
    elif mode == 3:
        filler = Image.new("RGB", image.size, (127, 127, 127))
    else:
        raise InvalidParameterError(f"`inpainting_fill` must be 0, 1, 2 or 3, got {mode}")
    return Image.composite(filler, image, mask.point(lambda v: 255 if v > 127 else 0))


def _inject_noise(pipe: Any, noise: Any) -> None:
    """Make this job's img2img pipeline add *our* seeded noise to the init latents.

    diffusers' img2img `prepare_latents` draws its noise from the generators,
    which cannot express A1111 variation seeds (a slerp of two seeds' noise).
    The image arrives already encoded (4 channels), so noising is all that is
    left: `add_noise(init_latents, noise, t)`. The pipeline is this job's own
    `from_pipe` copy, so the override never touches another job.
    """

    def prepare_latents(
        image: Any,
        timestep: Any,
        batch_size: int,
        num_images_per_prompt: int,
        dtype: Any,
        device: Any,
        generator: Any = None,
        *_: Any,
        **__: Any,
    ) -> Any:
        init = image.to(device=device, dtype=dtype)
        return pipe.scheduler.add_noise(init, noise.to(device=device, dtype=dtype), timestep)

    pipe.prepare_latents = prepare_latents
