"""ControlNet as extra conditioning of the denoise passes (sd-webui-controlnet's API).

    build_conditioning(request, ...)    stage 1: units checked, images decoded and
                                         preprocessed, ControlNet models loaded
      └─ ControlNetConditioning
           .pipeline(pipe)               the job's pipeline as a diffusers ControlNet
                                         pipeline (`from_pipe`: the checkpoint's
                                         weights shared, never reloaded)
           .call_kwargs(...)             control images, weights, guidance window
           .extra_params                 `ControlNet 0: "Module: ..."` infotext fields

Every unit runs through one `UnitsControlNet` (a diffusers
`MultiControlNetModel`), so one unit and several take the same path. It adds
the extension's control modes on top of diffusers: "My prompt is more
important" scales the residuals down towards the shallow blocks
(0.825 ** (12 - i), the extension's soft injection) and "ControlNet is more
important" also leaves the unconditional half of classifier-free guidance
without control (its CFG injection). `guidance_start`/`guidance_end` are
diffusers' `control_guidance_start/end`: outside its window a unit's scale is 0.

ControlNet models come from `ControlNet/` in the models bucket (a diffusers
folder, or one `.safetensors` in the original or diffusers key layout with its
config beside it or built in), loaded through the model store as a
`ModelKind`: the same disk/RAM/GPU tiers, budgets and LRU as checkpoints,
pinned while a render uses them.

Errors: an unknown module or model is `InvalidParameterError` /
`ModelNotFoundError` naming it, raised before the checkpoint is loaded; a
model that does not fit the checkpoint's family fails naming both.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from runtime import preprocessors
from runtime.controlnet_units import ControlNetUnit, parse_units
from sdeks.errors import InvalidParameterError, ModelLoadError, ModelNotFoundError
from sdeks.names import MODELS_CONTROLNET_PREFIX

log = logging.getLogger(__name__)

#: `GET /controlnet/version` (the extension's `external_code.get_api_version()`).
API_VERSION = 2
#: The extension's soft-injection base (`hook.py`: 0.825 ** (12 - i)).
SOFT_INJECTION = 0.825

# Configs for single files that ship none: the SD 1.5 ControlNet (lllyasviel's
# v1.0/v1.1 models) and the full-size SDXL one (diffusers/controlnet-*-sdxl-1.0).
_SD15_CONFIG: dict[str, Any] = {"cross_attention_dim": 768}
_SDXL_CONFIG: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "cross_attention_dim": 2048,
}


# --- loading ControlNet models -------------------------------------------------


def family_of(controlnet: Any) -> str:
    """ "sdxl" / "sd2" / "sd15" from a ControlNet's cross-attention width."""
    dim = controlnet.config.cross_attention_dim
    dim = dim[0] if isinstance(dim, list | tuple) else dim
    if controlnet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if dim == 1024 else "sd15"


def _single_file_config(path: Path, config_dir: Path | None, work: Path) -> Path:
    """A folder with `config.json` for a single-file ControlNet: its own, or a built-in one."""
    if config_dir is not None:
        return config_dir
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    sdxl = any(k.endswith("add_embedding.linear_1.weight") for k in keys)
    config = {"_class_name": "ControlNetModel", **(_SDXL_CONFIG if sdxl else _SD15_CONFIG)}
    folder = work / ("builtin-sdxl" if sdxl else "builtin-sd15")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_controlnet(
    path: Path, *, name: str, dtype: Any, device: str, config_dir: Path | None, work: Path
) -> Any:
    """A `ControlNetModel` from a diffusers folder or a single `.safetensors`, offline.

    The store calls it (the kind's `load`) under its diffusers construction lock
    (`ModelStore._load_kind_to_ram`), so it takes no lock of its own."""
    import torch
    from diffusers import ControlNetModel

    from runtime.model_store import dtype_kwargs

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs.update(dtype_kwargs(dtype))
    try:
        if path.is_dir():
            model = ControlNetModel.from_pretrained(str(path), **kwargs)
        else:
            config = _single_file_config(path, config_dir, work)
            model = ControlNetModel.from_single_file(str(path), config=str(config), **kwargs)
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        from sdeks.errors import OutOfMemoryError

        raise OutOfMemoryError(f"out of memory loading ControlNet model {name}") from exc
    except Exception as exc:  # diffusers raises OSError, ValueError, KeyError...
        raise ModelLoadError(
            f"cannot load ControlNet model {name}: {type(exc).__name__}: {exc}"[:400]
        ) from exc
    if device != "cpu":
        model = model.to(device)
    return model.eval().requires_grad_(False)


def controlnet_kind(models: Any, work_dir: Path) -> Any:
    """The store's `ModelKind` for `ControlNet/`: ControlNets share the checkpoints'
    disk/RAM/GPU tiers, budgets and LRU. A single file's config comes from its
    `<name>.config/` folder (fetched through the store), else a built-in one."""
    from runtime.model_store import ModelKind

    def config_of(entry: Any) -> Path | None:
        if entry.kind == "file" and entry.config_key:
            return models.fetch_file(entry.config_key + "config.json").parent
        return None

    def prepare(entry: Any) -> None:
        config_of(entry)  # the download, before the store takes its construction lock

    def load(path: Path, entry: Any) -> Any:
        return load_controlnet(
            path,
            name=entry.name,
            dtype=None,
            device="cpu",
            config_dir=config_of(entry),
            work=work_dir,
        )

    def to_device(model: Any, device: str, dtype: Any) -> Any:
        import copy

        return copy.deepcopy(model).to(device=device, dtype=dtype)

    return ModelKind(
        "controlnet",
        folders=(MODELS_CONTROLNET_PREFIX,),
        load=load,
        to_device=to_device,
        display_name=controlnet_title,
        prepare=prepare,
    )


def controlnet_title(entry: Any) -> str:
    """The extension's model name: `control_v11p_sd15_canny [d14c016b]` (8-hex hash when known)."""
    name = entry.model_name
    return f"{name} [{entry.sha256[:8]}]" if entry.sha256 else name


def model_list(models: Any, kind: Any) -> list[str]:
    """`GET /controlnet/model_list` (without the extension's "None")."""
    return [controlnet_title(e) for e in models.entries(kind)]


# --- the units at work ----------------------------------------------------------


def _multi_base() -> type:
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    return MultiControlNetModel


def make_units_controlnet(nets: list[Any], units: list[ControlNetUnit], cfg: bool) -> Any:
    """A `MultiControlNetModel` over `nets` that applies each unit's control mode."""
    base = _multi_base()

    class UnitsControlNet(base):  # type: ignore[misc, valid-type]
        def forward(
            self,
            sample: Any,
            timestep: Any,
            encoder_hidden_states: Any,
            controlnet_cond: list[Any],
            conditioning_scale: list[float],
            class_labels: Any = None,
            timestep_cond: Any = None,
            attention_mask: Any = None,
            added_cond_kwargs: Any = None,
            cross_attention_kwargs: Any = None,
            guess_mode: bool = False,
            return_dict: bool = True,
        ) -> Any:
            down_sum: list[Any] | None = None
            mid_sum: Any = None
            for image, scale, net, unit in zip(
                controlnet_cond, conditioning_scale, self.nets, units, strict=True
            ):
                if scale == 0:
                    continue  # outside the unit's guidance window: no control at all
                down, mid = net(
                    sample=sample,
                    timestep=timestep,
                    encoder_hidden_states=encoder_hidden_states,
                    controlnet_cond=image,
                    conditioning_scale=scale,
                    class_labels=class_labels,
                    timestep_cond=timestep_cond,
                    attention_mask=attention_mask,
                    added_cond_kwargs=added_cond_kwargs,
                    cross_attention_kwargs=cross_attention_kwargs,
                    guess_mode=guess_mode,
                    return_dict=False,
                )
                down, mid = _apply_mode(list(down), mid, unit, cfg)
                if down_sum is None:
                    down_sum, mid_sum = down, mid
                else:
                    down_sum = [a + b for a, b in zip(down_sum, down, strict=True)]
                    mid_sum = mid_sum + mid
            # Every unit outside its window this step: no residuals, the UNet runs as without
            # ControlNet (diffusers' UNet skips the additions when they are None).
            return down_sum, mid_sum

    return UnitsControlNet(nets)


def _apply_mode(
    down: list[Any], mid: Any, unit: ControlNetUnit, cfg: bool
) -> tuple[list[Any], Any]:
    """The extension's per-block scales (advanced weighting, soft injection) and CFG injection."""
    n = len(down) + 1
    if unit.advanced_weighting is not None:
        weights = unit.advanced_weighting
        if len(weights) != n:
            raise InvalidParameterError(
                f"`advanced_weighting` of ControlNet unit {unit.index} has {len(weights)} values; "
                f"this model has {n} control layers"
            )
        down = [d * w for d, w in zip(down, weights[:-1], strict=True)]
        mid = mid * weights[-1]
    elif unit.control_mode != "Balanced":
        down = [d * SOFT_INJECTION ** float(n - 1 - i) for i, d in enumerate(down)]
    if unit.control_mode == "ControlNet is more important" and cfg:
        # diffusers batches [unconditional, conditional]: control only the conditional half.
        half = mid.shape[0] // 2
        down = [_zero_first(d, half) for d in down]
        mid = _zero_first(mid, half)
    return down, mid


def _zero_first(t: Any, half: Any) -> Any:
    out = t.clone()
    out[:half] = 0
    return out


_PIPELINES = {
    ("sd", "txt2img"): "StableDiffusionControlNetPipeline",
    ("sd", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


def controlnet_pipeline(pipe: Any, kind: str, controlnet: Any) -> Any:
    """The job's pipeline as a ControlNet pipeline of `kind`, sharing every component."""
    import diffusers

    line = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    cls = getattr(diffusers, _PIPELINES[(line, kind)])
    parts = {k: v for k, v in pipe.components.items() if k in _wanted(cls)}
    if line == "sd":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    new = cls(**parts, controlnet=controlnet)
    new.set_progress_bar_config(disable=True)
    return new


def _kind_of(pipe: Any) -> str:
    name = type(pipe).__name__
    return "inpaint" if "Inpaint" in name else ("img2img" if "Img2Img" in name else "txt2img")


def _wanted(cls: Any) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self", "controlnet"}


# --- images -------------------------------------------------------------------------


def resize_control(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """The unit's `resize_mode` onto the render size (the extension's `high_quality_resize`
    modes): stretch, crop to fill, or fit inside and pad with black."""
    lanczos = Image.Resampling.LANCZOS
    if mode == "Just Resize":
        return image.resize((width, height), lanczos)
    if mode == "Crop and Resize":
        return ImageOps.fit(image, (width, height), lanczos)
    fitted = ImageOps.contain(image, (width, height), lanczos)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return canvas


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, mode: str) -> int:
    """The extension's `pixel_perfect_resolution`: the preprocessor resolution that maps the
    input onto the render size without resampling twice."""
    k0, k1 = height / image.height, width / image.width
    k = min(k0, k1) if mode == "Resize and Fill" else max(k0, k1)
    return round(k * min(image.height, image.width))


@dataclass
class PreparedUnit:
    unit: ControlNetUnit
    model_title: str
    #: The store's lease (`WeightsLease`): the model stays pinned until `release`.
    lease: Any
    #: The control map at the render size.
    control: Image.Image
    detected: preprocessors.Detected


@dataclass
class ControlNetConditioning:
    """The active units of one request, ready for the denoise stage."""

    units: list[PreparedUnit]
    kind: str
    cfg: bool
    #: The request asks for hires fix (`hr_option` then splits the units between passes).
    hires: bool = False
    extra_params: dict[str, Any] = field(default_factory=dict)

    def units_for(self, pass_name: str) -> list[PreparedUnit]:
        """The units of a pass: `hr_option` "Low res only" skips the hires pass, "High res
        only" the first one (without hires fix every unit runs in the first pass)."""
        skip = "Low res only" if pass_name == "hires" else "High res only"
        if pass_name == "first" and not self.hires:
            return list(self.units)
        return [p for p in self.units if p.unit.hr_option != skip]

    def pipeline(self, pipe: Any, ctx: Any) -> Any:
        """Stage 2 (and the hires pass): `pipe` as the ControlNet pipeline of its kind."""
        kind = _kind_of(pipe)
        pass_name = "hires" if kind == "img2img" and self.kind == "txt2img" else "first"
        units = self.units_for(pass_name)
        if not units:
            return pipe
        unet_dim = pipe.unet.config.cross_attention_dim
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        for p in units:
            if p.lease.model.config.cross_attention_dim != unet_dim:
                raise InvalidParameterError(
                    f"ControlNet unit {p.unit.index}: model {p.model_title!r} is a "
                    f"{family_of(p.lease.model)} ControlNet and does not fit this "
                    f"{'SDXL' if sdxl else 'SD 1.x/2.x'} checkpoint"
                )
        multi = make_units_controlnet(
            [p.lease.model for p in units], [p.unit for p in units], self.cfg
        )
        return controlnet_pipeline(pipe, kind, multi)

    def call_kwargs(self, batch: Any, pass_name: str, width: int, height: int) -> dict[str, Any]:
        units = self.units_for(pass_name)
        if not units:
            return {}
        images = [
            p.control
            if p.control.size == (width, height)
            else resize_control(p.detected.image.convert("RGB"), p.unit.resize_mode, width, height)
            for p in units
        ]
        kind = self.kind if pass_name == "first" else "img2img"
        extra: dict[str, Any] = {}
        if kind == "inpaint":
            # diffusers' ControlNet inpaint cannot crop several control images to the mask
            # (`padding_mask_crop`): with units the whole picture is inpainted.
            extra["padding_mask_crop"] = None
        return {
            **extra,
            "image" if kind == "txt2img" else "control_image": images,
            "controlnet_conditioning_scale": [p.unit.weight for p in units],
            "control_guidance_start": [p.unit.guidance_start for p in units],
            "control_guidance_end": [p.unit.guidance_end for p in units],
        }

    def release(self) -> None:
        for p in self.units:
            p.lease.release()

    def detected_maps(self) -> list[Image.Image]:
        return [p.detected.image for p in self.units if p.unit.extra.get("save_detected_map", True)]


class ControlNetProvider:
    """The `runtime.conditioning` provider for `alwayson_scripts.controlnet` (any case)."""

    script = "controlnet"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._per_store: weakref.WeakKeyDictionary[Any, tuple[Any, preprocessors.Annotators]] = (
            weakref.WeakKeyDictionary()
        )

    def support(self, models: Any, settings: Any) -> tuple[Any, preprocessors.Annotators]:
        """(the ControlNet `ModelKind`, the annotators) of one model store."""
        with self._lock:
            found = self._per_store.get(models)
            if found is None:
                work = Path(settings.cache_dir) / "controlnet-configs"
                found = (
                    controlnet_kind(models, work),
                    preprocessors.Annotators(models.fetch_file, models.device),
                )
                self._per_store[models] = found
            return found

    def build(
        self, args: Any, plan: Any, models: Any, settings: Any
    ) -> ControlNetConditioning | None:
        from runtime.images import decode_image

        request = plan.request
        kind, annotators = self.support(models, settings)
        limit = settings.max_upscale_pixels
        conditioning = build_conditioning(
            request.alwayson_scripts,
            kind=plan.kind,
            width=request.width,
            height=request.height,
            cfg_scale=request.cfg_scale,
            init_image=plan.init_image,
            models=models,
            model_kind=kind,
            annotators=annotators,
            decode=lambda data, where: decode_image(data, where, limit),
        )
        if conditioning is not None:
            conditioning.hires = bool(getattr(request, "enable_hr", False))
            plan.extra_params.update(conditioning.extra_params)  # the infotext fields
        return conditioning


PROVIDER = ControlNetProvider()


def build_conditioning(
    alwayson_scripts: dict[str, Any],
    *,
    kind: str,
    width: int,
    height: int,
    cfg_scale: float,
    init_image: Image.Image | None,
    models: Any,
    model_kind: Any,
    annotators: preprocessors.Annotators | None,
    decode: Any,
) -> ControlNetConditioning | None:
    """Stage 1 for ControlNet: None when the request has no active unit (a no-op)."""
    units = [u for u in parse_units(alwayson_scripts) if u.active]
    if not units:
        return None
    where = "alwayson_scripts.controlnet.args"
    # Names first: an unknown module or model fails before any image or weight work.
    entries = []
    for u in units:
        preprocessors.get(u.module, f"{where}[{u.index}].module")
        if u.model in ("None", "none", ""):
            raise InvalidParameterError(
                f"`{where}[{u.index}].model` is None: an enabled unit needs a ControlNet model "
                "(GET /controlnet/model_list)"
            )
        try:
            entries.append(models.resolve_weights(model_kind, u.model))
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"`{where}[{u.index}].model`: {exc.message}") from exc
    prepared: list[PreparedUnit] = []
    try:
        for u, entry in zip(units, entries, strict=True):
            source = _unit_image(u, init_image, decode, where)
            res = u.processor_res
            if u.pixel_perfect:
                res = pixel_perfect_resolution(source, width, height, u.resize_mode)
            detected = preprocessors.detect(
                source,
                u.module,
                processor_res=res,
                threshold_a=u.threshold_a,
                threshold_b=u.threshold_b,
                annotators=annotators,
                where=f"{where}[{u.index}].module",
            )
            u.processor_res, u.threshold_a, u.threshold_b = (
                detected.processor_res,
                detected.threshold_a,
                detected.threshold_b,
            )
            control = resize_control(detected.image.convert("RGB"), u.resize_mode, width, height)
            lease = models.acquire_weights(model_kind, entry)
            title = controlnet_title(lease.entry)
            u.model = title
            prepared.append(PreparedUnit(u, title, lease, control, detected))
    except BaseException:
        for p in prepared:
            p.lease.release()
        raise
    extra = {f"ControlNet {i}": p.unit.infotext() for i, p in enumerate(prepared)}
    return ControlNetConditioning(prepared, kind, cfg=cfg_scale > 1.0, extra_params=extra)


def _unit_image(
    unit: ControlNetUnit,
    init_image: Image.Image | None,
    decode: Any,
    where: str,
) -> Image.Image:
    """The unit's input: its own image, else (img2img) the init image, as the extension does."""
    if unit.image is not None:
        image = decode(unit.image, f"{where}[{unit.index}].image").convert("RGB")
        if unit.mask is not None:
            unit_mask = decode(unit.mask, f"{where}[{unit.index}].mask").convert("L")
            # The extension's inpaint input: masked pixels are what the model fills in.
            image = Image.composite(
                Image.new("RGB", image.size), image, unit_mask.resize(image.size)
            )
        return image
    if init_image is not None:
        return init_image
    raise InvalidParameterError(
        f"`{where}[{unit.index}].image` is missing: a txt2img ControlNet unit needs an image"
    )
