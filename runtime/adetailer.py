"""ADetailer (`alwayson_scripts.ADetailer`): detect regions, inpaint each one, stage 6.

The extension's API (`adetailer/args.py`, `scripts/!adetailer.py`):
`args` is `[enable, (skip_img2img,) {ad_model, ad_prompt, ...}, {...}, ...]`;
a leading boolean is the switch (`[false]` is a no-op), each object one
detector pass with the extension's defaults (`ADetailerArgs`; unknown keys are
refused, as its `extra=forbid` does; booleans and numbers are read as its
pydantic model reads them, `"true"` and `"0.5"` included). Old names still
sent by clients are folded into the current ones (`ad_tap_enable` ->
`ad_tab_enable`, `ad_mask_k_largest` -> `ad_mask_k`, the pair
`ad_controlnet_guidance_start_end` -> start and end). For each finished image
and each pass: detect with `ad_model` (from `adetailer/` in the bucket,
`runtime.detectors`), keep boxes above `ad_confidence` (then
`ad_mask_min/max_ratio`, then the `ad_mask_k` largest or most confident by
`ad_mask_filter_method`), turn them into masks dilated by `ad_dilate_erode`
(`ad_mask_merge_invert` merges or inverts them), and inpaint each mask in
turn with the render's own checkpoint: seed + j, `ad_denoising_strength`,
`ad_mask_blur`, `ad_inpaint_only_masked` (+ padding), `ad_inpaint_masked_content`,
`ad_prompt` (+ `ad_prompt_append`), separate size / steps / CFG / CLIP skip
when `ad_use_inpaint_width_height` / `ad_use_steps` / `ad_use_cfg_scale` /
`ad_use_clip_skip`, and per pass (`PassTools`, built once for the stage):
another checkpoint (`ad_use_checkpoint`, leased for the stage), VAE
(`ad_use_vae`), sampler and schedule (`ad_use_sampler`), initial noise
multiplier (`ad_use_noise_multiplier`), face restoration of the inpainted
result (`ad_restore_face`), boxes grown before masking
(`ad_mask_bbox_expansion`). A setting this stage cannot honour (ControlNet
inside ADetailer, `ad_inpaint_scale`) is refused naming it, unless its value
is the neutral one. Pixels outside the
blurred mask are the original's, exactly. What was found goes into the
infotext and `info.extra_generation_params` (`ADetailer detections`).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from runtime.controlnet_units import script_args
from runtime.values import is_unset, lax_bool, lax_number
from sdeks.errors import InvalidParameterError, ModelLoadError, ModelNotFoundError

SCRIPT = "adetailer"
VERSION = "sdeks"
MERGE_INVERT = ("None", "Merge", "Merge and Invert")
FILTER_METHODS = ("Area", "Confidence")
#: `ad_inpaint_masked_content` -> A1111's `inpainting_fill` index (`runtime.images.fill_masked`).
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


@dataclass
class ADetailerArgs:
    """One detector pass, with the extension's defaults (current names; see `_ALIASES`)."""

    ad_model: str = "None"
    ad_model_classes: str = ""
    ad_tab_enable: bool = True
    ad_prompt: str = ""
    ad_prompt_append: str = ""
    ad_negative_prompt: str = ""
    ad_negative_prompt_append: str = ""
    ad_confidence: float = 0.3
    ad_mask_filter_method: str = "Area"
    ad_mask_k: int = 0
    ad_mask_min_ratio: float = 0.0
    ad_mask_max_ratio: float = 1.0
    ad_dilate_erode: int = 4
    ad_mask_bbox_expansion: int = 0
    ad_x_offset: int = 0
    ad_y_offset: int = 0
    ad_mask_merge_invert: str = "None"
    ad_mask_blur: int = 4
    ad_denoising_strength: float = 0.4
    ad_inpaint_masked_content: str = "original"
    ad_inpaint_only_masked: bool = True
    ad_inpaint_only_masked_padding: int = 32
    ad_use_inpaint_width_height: bool = False
    ad_inpaint_width: int = 512
    ad_inpaint_height: int = 512
    ad_inpaint_scale: float = 1.0
    ad_use_steps: bool = False
    ad_steps: int = 28
    ad_use_cfg_scale: bool = False
    ad_cfg_scale: float = 7.0
    ad_use_checkpoint: bool = False
    ad_checkpoint: str | None = None
    ad_use_vae: bool = False
    ad_vae: str | None = None
    ad_use_sampler: bool = False
    ad_sampler: str = "DPM++ 2M Karras"
    ad_scheduler: str = "Use same scheduler"
    ad_use_noise_multiplier: bool = False
    ad_noise_multiplier: float = 1.0
    ad_use_clip_skip: bool = False
    ad_clip_skip: int = 1
    ad_restore_face: bool = False
    ad_hires_fix_only: bool = False
    ad_controlnet_model: str = "None"
    ad_controlnet_module: str = "None"
    ad_controlnet_weight: float = 1.0
    ad_controlnet_guidance_start: float = 0.0
    ad_controlnet_guidance_end: float = 1.0
    ad_controlnet_use_crop_input: bool = True
    #: The extension's marker of an API call: any of the shapes clients send (no effect).
    is_api: Any = True

    @property
    def active(self) -> bool:
        return self.ad_model != "None" and self.ad_tab_enable

    def prompts(self, prompt: str, negative: str) -> tuple[str, str]:
        """The pass's (prompt, negative prompt): `ad_prompt` (with `[PROMPT]` replaced by the
        render's) or the render's own, then `ad_prompt_append` after a comma."""
        positive = self.ad_prompt.replace("[PROMPT]", prompt) if self.ad_prompt else prompt
        negative_out = (
            self.ad_negative_prompt.replace("[PROMPT]", negative)
            if self.ad_negative_prompt
            else negative
        )
        return (
            _append(positive, self.ad_prompt_append),
            _append(negative_out, self.ad_negative_prompt_append),
        )


def _append(prompt: str, tail: str) -> str:
    if not tail.strip():
        return prompt
    base = prompt.rstrip().rstrip(",").rstrip()
    return f"{base}, {tail.strip()}" if base else tail.strip()


#: (low, high) of the numeric fields (the extension's pydantic constraints).
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "ad_confidence": (0, 1),
    "ad_mask_k": (0, 1000),
    "ad_mask_min_ratio": (0, 1),
    "ad_mask_max_ratio": (0, 1),
    "ad_dilate_erode": (-128, 128),
    "ad_mask_bbox_expansion": (0, 4096),
    "ad_x_offset": (-4096, 4096),
    "ad_y_offset": (-4096, 4096),
    "ad_mask_blur": (0, 64),
    "ad_denoising_strength": (0, 1),
    "ad_inpaint_only_masked_padding": (0, 1024),
    "ad_inpaint_width": (1, 4096),
    "ad_inpaint_height": (1, 4096),
    "ad_inpaint_scale": (0, 16),
    "ad_steps": (1, 150),
    "ad_cfg_scale": (0, 100),
    "ad_noise_multiplier": (0.5, 1.5),
    "ad_clip_skip": (1, 12),
    "ad_controlnet_weight": (0, 1),
    "ad_controlnet_guidance_start": (0, 1),
    "ad_controlnet_guidance_end": (0, 1),
}
_FIELDS = {f.name: f for f in fields(ADetailerArgs)}
#: Old names still sent by clients -> the extension's current name. Both sent: they must agree.
_ALIASES = {"ad_tap_enable": "ad_tab_enable", "ad_mask_k_largest": "ad_mask_k"}
#: Fields that take one of a few names.
_CHOICES: dict[str, tuple[str, ...]] = {
    "ad_mask_merge_invert": MERGE_INVERT,
    "ad_mask_filter_method": FILTER_METHODS,
    "ad_inpaint_masked_content": MASKED_CONTENT,
}
_OPTIONAL_STR = ("ad_checkpoint", "ad_vae")


def parse_args(alwayson_scripts: dict[str, Any]) -> list[ADetailerArgs]:
    """The active passes of the request ([] when ADetailer is off or absent)."""
    found = script_args(alwayson_scripts, SCRIPT)
    if found is None:
        return []
    key, args = found
    where = f"alwayson_scripts.{key}.args"
    if args is None:
        return []
    if not isinstance(args, list):
        raise InvalidParameterError(f"`{where}` must be a list, got {type(args).__name__}")
    # The leading switches (`enable`, then `skip_img2img`): booleans, or the strings and
    # 0/1 some clients send for them (the extension's lax pydantic reads those too).
    switches: list[bool] = []
    for raw in args[:2]:
        if isinstance(raw, dict) or raw is None:
            break
        switches.append(lax_bool(raw, f"{where}[{len(switches)}]"))
    enabled = switches[0] if switches else True
    passes = []
    for i, raw in enumerate(args):
        if i < len(switches):
            continue
        if isinstance(raw, bool):
            raise InvalidParameterError(f"`{where}[{i}]` must be an object, got {raw}")
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise InvalidParameterError(
                f"`{where}[{i}]` must be an object of ad_* fields, got {type(raw).__name__}"
            )
        passes.append(_parse_one(raw, f"{where}[{i}]"))
    if not enabled:
        return []
    return [p for p in passes if p.active]


def _parse_one(raw: dict[str, Any], where: str) -> ADetailerArgs:
    values = _canonical(raw, where)
    args = ADetailerArgs()
    for name, value in values.items():
        if name not in _FIELDS:
            raise InvalidParameterError(f"`{where}.{name}` is not an ADetailer field")
        setattr(args, name, _value(name, value, getattr(args, name), f"{where}.{name}"))
    _check_supported(args, where)
    if args.ad_model.lower().startswith("mediapipe"):
        raise InvalidParameterError(
            f"`{where}.ad_model` {args.ad_model!r}: mediapipe detectors are not available; "
            "use a detector file from adetailer/"
        )
    return args


def _canonical(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """`raw` under the current field names: old aliases folded in, the start/end pair split."""
    values = dict(raw)
    for alias, name in _ALIASES.items():
        if alias not in values:
            continue
        old = values.pop(alias)
        if name in values and values[name] is not None and old is not None:
            if _value(name, old, _default(name), f"{where}.{alias}") != _value(
                name, values[name], _default(name), f"{where}.{name}"
            ):
                raise InvalidParameterError(
                    f"`{where}` has `{alias}` ({old!r:.40}) and its current name `{name}` "
                    f"({values[name]!r:.40}) with different values"
                )
        elif old is not None:
            values[name] = old
    pair = values.pop("ad_controlnet_guidance_start_end", None)
    if pair is not None:
        spot = f"{where}.ad_controlnet_guidance_start_end"
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InvalidParameterError(f"`{spot}` must be [start, end], got {pair!r:.80}")
        start, end = (lax_number(v, spot, low=0, high=1) for v in pair)
        if start > end:
            raise InvalidParameterError(f"`{spot}`: start {start:g} is greater than end {end:g}")
        for name, number in (
            ("ad_controlnet_guidance_start", start),
            ("ad_controlnet_guidance_end", end),
        ):
            sent = values.get(name)
            if sent is not None and lax_number(sent, f"{where}.{name}") != number:
                raise InvalidParameterError(
                    f"`{where}.{name}` ({sent!r:.40}) disagrees with "
                    "`ad_controlnet_guidance_start_end`"
                )
            values[name] = number
    return values


def _default(name: str) -> Any:
    return getattr(ADetailerArgs(), name)


def _value(name: str, value: Any, default: Any, where: str) -> Any:
    """One field's value, read as the extension's pydantic model reads it (lax scalars)."""
    if name == "is_api":
        if value is None or isinstance(value, bool | list | tuple):
            return value
        raise InvalidParameterError(f"`{where}` must be true, false or a list, got {value!r:.80}")
    if value is None:
        return None if name in _OPTIONAL_STR else default
    low, high = _RANGES.get(name, (None, None))
    if isinstance(default, bool):
        return lax_bool(value, where)
    if isinstance(default, int):
        return int(lax_number(value, where, integer=True, low=low, high=high))
    if isinstance(default, float):
        return lax_number(value, where, low=low, high=high)
    if not isinstance(value, str) or len(value) > 4000:
        raise InvalidParameterError(f"`{where}` must be a string, got {value!r:.80}")
    choices = _CHOICES.get(name)
    if choices is not None and value not in choices:
        raise InvalidParameterError(
            f"`{where}` must be one of {', '.join(map(repr, choices))}, got {value!r:.80}"
        )
    return value


def _check_supported(args: ADetailerArgs, where: str) -> None:
    """Refuse, naming the field, a setting this stage cannot honour; accept its neutral value."""
    if not args.active:
        return
    refused = {
        "ad_controlnet_model": (
            not is_unset(args.ad_controlnet_model),
            "ControlNet inside ADetailer",
        ),
        "ad_inpaint_scale": (args.ad_inpaint_scale != 1.0, "an inpaint scale other than 1"),
    }
    for name, (bad, what) in refused.items():
        if bad:
            raise InvalidParameterError(
                f"`{where}.{name}`: {what} is not supported by ADetailer here"
            )


# --- what a pass inpaints with (the `ad_use_*` switches) ---------------------------


def pass_sampler(args: ADetailerArgs, request: Any) -> Any:
    """`ad_use_sampler`: the pass's `samplers.SamplerChoice`, or None for the render's own.

    As the extension: "Use same sampler" / "Use same scheduler" take the request's;
    a schedule label at the end of `ad_sampler` ("DPM++ 2M Karras") wins, as in A1111."""
    from runtime import samplers

    if not args.ad_use_sampler or (is_unset(args.ad_sampler) and is_unset(args.ad_scheduler)):
        return None
    sampler = request.sampler if is_unset(args.ad_sampler) else args.ad_sampler
    scheduler = request.scheduler if is_unset(args.ad_scheduler) else args.ad_scheduler
    try:
        return samplers.resolve(sampler, scheduler)
    except InvalidParameterError as exc:
        raise InvalidParameterError(
            exc.message.replace("`sampler_name`", "`ad_sampler`").replace(
                "`scheduler`", "`ad_scheduler`"
            )
        ) from exc


def pass_checkpoint(args: ADetailerArgs, plan: Any, models: Any) -> str | None:
    """`ad_use_checkpoint`: the checkpoint the pass inpaints with, or None for the render's.

    Unknown: `model_not_found` naming `ad_checkpoint`. Prompt LoRAs are refused with
    another checkpoint (they are applied to the render's weights only), as hires fix
    refuses them with `hr_checkpoint_name`."""
    name = args.ad_checkpoint
    if not args.ad_use_checkpoint or is_unset(name):
        return None
    assert name is not None
    try:
        entry = models.resolve(name)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"`ad_checkpoint` {name!r}: {exc.message}") from exc
    if entry.key == models.resolve(plan.checkpoint).key:
        return None
    if plan.loras:
        raise InvalidParameterError(
            f"`ad_checkpoint` {name!r}: prompt LoRAs are not supported with a different "
            "ADetailer checkpoint"
        )
    return name


def pass_vae(args: ADetailerArgs) -> str | None:
    """`ad_use_vae`: the `VAE/` file the pass encodes and decodes with, or None."""
    from runtime.a1111 import is_no_vae

    if not args.ad_use_vae or is_no_vae(args.ad_vae):
        return None
    return args.ad_vae


def pass_restorer(args: ADetailerArgs, plan: Any, models: Any) -> tuple[str, float] | None:
    """`ad_restore_face`: (restorer, CodeFormer weight) from the A1111 options in force
    (`face_restoration_model`, `code_former_weight`), as the extension's inner img2img
    with `restore_faces` uses them; None when off."""
    if not args.ad_restore_face:
        return None
    from runtime import face_restoration

    return face_restoration._options_of(plan, models)


def noise_multiplier(args: ADetailerArgs, opts: dict[str, Any]) -> float:
    """A1111's `initial_noise_multiplier` for the pass: `ad_noise_multiplier` when
    `ad_use_noise_multiplier`, else the option in force, as the extension's inner
    img2img (which gets None, so A1111 reads the option)."""
    from runtime.stages.denoise import noise_multiplier_of

    if args.ad_use_noise_multiplier:
        return args.ad_noise_multiplier
    return noise_multiplier_of(None, opts)


@dataclass
class PassTools:
    """What one pass inpaints with, built once per pass for the whole stage."""

    #: The pipeline the inpaint pipeline is derived from (the render's, or `ad_checkpoint`'s).
    source: Any
    family: Any
    #: The pass's VAE (`ad_vae`), or None for the source's.
    vae: Any = None
    #: The scheduler to set, or None to keep the source's (the render's sampler).
    choice: Any = None
    #: The scheduler config `choice` starts from (the checkpoint's own, untouched).
    scheduler_config: Any = None
    restorer: tuple[str, float] | None = None
    noise_multiplier: float = 1.0


# --- masks (the extension's mask.py) ----------------------------------------------


def box_masks(
    size: tuple[int, int], boxes: list[tuple[float, float, float, float]]
) -> list[Image.Image]:
    masks = []
    for box in boxes:
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        masks.append(mask)
    return masks


def dilate_erode(mask: Image.Image, value: int) -> Image.Image:
    import cv2

    if value == 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (abs(value), abs(value)))
    arr = np.asarray(mask)
    out = cv2.dilate(arr, kernel) if value > 0 else cv2.erode(arr, kernel)
    return Image.fromarray(out)


def preprocess_masks(masks: list[Image.Image], args: ADetailerArgs) -> list[Image.Image]:
    if args.ad_x_offset or args.ad_y_offset:
        masks = [ImageChops.offset(m, args.ad_x_offset, -args.ad_y_offset) for m in masks]
    if args.ad_dilate_erode:
        masks = [dilate_erode(m, args.ad_dilate_erode) for m in masks]
        masks = [m for m in masks if m.getbbox() is not None]
    if args.ad_mask_merge_invert != "None" and masks:
        merged = masks[0]
        for m in masks[1:]:
            merged = ImageChops.lighter(merged, m)
        masks = [merged if args.ad_mask_merge_invert == "Merge" else ImageChops.invert(merged)]
    return masks


def _filter(dets: list[Any], args: ADetailerArgs, size: tuple[int, int]) -> list[Any]:
    """The extension's order: the area ratio bounds, then the top `ad_mask_k` by
    `ad_mask_filter_method` ("Area": the largest boxes, "Confidence": the surest)."""
    area = size[0] * size[1]

    def box_area(d: Any) -> float:
        x1, y1, x2, y2 = d.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    dets = [
        d for d in dets if args.ad_mask_min_ratio <= box_area(d) / area <= args.ad_mask_max_ratio
    ]
    if args.ad_mask_k:
        key = box_area if args.ad_mask_filter_method == "Area" else (lambda d: d.score)
        dets = sorted(dets, key=key, reverse=True)[: args.ad_mask_k]
    return dets


# --- the stage --------------------------------------------------------------------


class ADetailerStage:
    """A `runtime.postprocess` stage."""

    script: str | None = SCRIPT

    def check(self, plan: Any, models: Any, settings: Any) -> None:
        from runtime.detectors import resolve_detector
        from runtime.face_restoration import check_restorer

        for n, args in enumerate(passes_of(plan)):
            where = f"ADetailer pass {n + 1}"
            vae = None
            if args.ad_use_inpaint_width_height:
                _check_inpaint_size(args, n, settings)
            try:
                resolve_detector(models, args.ad_model)
            except (ModelNotFoundError, ModelLoadError) as exc:
                raise type(exc)(f"{where} `ad_model`: {exc.message}") from exc
            try:
                pass_sampler(args, plan.request)
                pass_checkpoint(args, plan, models)
                vae = pass_vae(args)
                if vae is not None:
                    models.fetch_vae(vae)
                restorer = pass_restorer(args, plan, models)
                if restorer is not None:
                    check_restorer(models, restorer[0], "ad_restore_face")
            except (InvalidParameterError, ModelNotFoundError, ModelLoadError) as exc:
                message = exc.message
                if vae is not None and "`ad_" not in message:
                    message = f"`ad_vae` {vae!r}: {message}"
                raise type(exc)(f"{where}: {message}") from exc

    def enabled(self, plan: Any) -> bool:
        return bool(passes_of(plan))

    def run(self, images: list[Image.Image], plan: Any, ctx: Any) -> list[Image.Image]:
        passes = passes_of(plan)
        # Leases of other checkpoints are held for the whole stage and released at its
        # end; the render's own lease stays pinned meanwhile (the store never evicts a
        # pinned model), so nothing is unloaded under the running render.
        with ExitStack() as stack:
            tools = [self._tools(args, plan, ctx, stack) for args in passes]
            out, report = self._detail(images, passes, tools, plan, ctx)
        params = plan.extra_params
        for n, args in enumerate(passes):
            suffix = "" if n == 0 else f" {_ordinal(n + 1)}"
            params.update({f"{k}{suffix}": v for k, v in _params(args).items()})
        params["ADetailer detections"] = "; ".join(report)
        params["ADetailer version"] = VERSION
        return out

    def _detail(
        self,
        images: list[Image.Image],
        passes: list[ADetailerArgs],
        tools: list[PassTools],
        plan: Any,
        ctx: Any,
    ) -> tuple[list[Image.Image], list[str]]:
        from runtime.detectors import DETECTOR, resolve_detector

        report: list[str] = []
        out = []
        for i, image in enumerate(images):
            found = []
            for args, kit in zip(passes, tools, strict=True):
                ctx.control.check()
                entry = resolve_detector(ctx.models, args.ad_model)
                with ctx.models.use_weights(DETECTOR, entry) as lease:
                    dets = lease.model(image.convert("RGB"), args.ad_confidence)
                dets = _filter(dets, args, image.size)
                boxes = [expand_box(d.box, args.ad_mask_bbox_expansion, image.size) for d in dets]
                masks = preprocess_masks(box_masks(image.size, boxes), args)
                found.append(
                    f"{args.ad_model}: {len(dets)}"
                    + (f" ({', '.join(f'{d.score:.2f}' for d in dets)})" if dets else "")
                )
                seed = plan.plan.all_seeds[i] if i < len(plan.plan.all_seeds) else plan.plan.seed
                for j, mask in enumerate(masks):
                    ctx.control.check()
                    image = self._inpaint(image, mask, args, kit, plan, ctx, seed + j)
            report.append(f"image {i + 1}: " + "; ".join(found))
            out.append(image)
        return out, report

    def _tools(self, args: ADetailerArgs, plan: Any, ctx: Any, stack: ExitStack) -> PassTools:
        """The pass's pipeline source, VAE, sampler, restorer and noise multiplier."""
        from runtime.a1111 import is_no_vae

        kit = PassTools(
            source=ctx.pipe,
            family=ctx.family,
            choice=pass_sampler(args, plan.request),
            restorer=pass_restorer(args, plan, ctx.models),
            noise_multiplier=noise_multiplier(args, plan.opts),
        )
        checkpoint = pass_checkpoint(args, plan, ctx.models)
        if checkpoint is not None:
            lease = stack.enter_context(ctx.models.use(checkpoint, "inpaint"))
            if getattr(lease.family, "refiner", False):
                raise InvalidParameterError(
                    f"`ad_checkpoint` {checkpoint!r} is an SDXL refiner; it cannot inpaint "
                    "on its own: choose a base or inpainting checkpoint"
                )
            kit.source, kit.family = lease.pipeline, lease.family
            # Its own scheduler config; the render's sampler unless `ad_sampler` is set.
            kit.choice = kit.choice or plan.choice
            kit.scheduler_config = lease.pipeline.scheduler.config
            same_family = getattr(lease.family, "name", None) == getattr(ctx.family, "name", "")
            if not is_no_vae(plan.vae_name) and same_family:
                kit.source.vae = ctx.pipe.vae  # `sd_vae` applies to it, as in A1111
        elif kit.choice is not None:
            # The render's pipeline carries its sampler's options (Karras sigmas...): start
            # from the checkpoint's own scheduler config, kept by stage 2.
            kit.scheduler_config = ctx.base_scheduler_config or ctx.pipe.scheduler.config
        vae = pass_vae(args)
        if vae is not None:
            if ctx.vae_loader is not None:  # loaded once, as the render's `sd_vae`
                owner = checkpoint if checkpoint is not None else ctx.loaded.name
                kit.vae = ctx.vae_loader(owner, kit.source.vae, vae)
            else:
                from runtime.vae import load_vae

                kit.vae = load_vae(ctx.models.fetch_vae(vae), kit.source.vae, ctx.device)
        return kit

    def _inpaint(
        self,
        image: Image.Image,
        mask: Image.Image,
        args: ADetailerArgs,
        kit: PassTools,
        plan: Any,
        ctx: Any,
        seed: int,
    ) -> Image.Image:
        import torch

        from runtime import prompts, seeds
        from runtime.families import derive, diffusers_attr
        from runtime.images import fill_masked
        from runtime.stages.denoise import scaled_initial_noise

        request = plan.request
        overrides = {"vae": kit.vae} if kit.vae is not None else {}
        pipe = derive(kit.source, kit.family, "inpaint", **overrides)
        pipe.set_progress_bar_config(disable=True)
        if kit.choice is not None:
            extra = {"noise_sampler_seed": seed} if kit.choice.sampler.brownian else {}
            scheduler_cls = diffusers_attr(kit.choice.scheduler_class)
            pipe.scheduler = scheduler_cls.from_config(
                kit.scheduler_config, **kit.choice.scheduler_kwargs, **extra
            )
        prompt, negative = args.prompts(plan.prompt, plan.negative_prompt)
        # A1111's CLIP skip counts layers from the end (1 = last); diffusers' skips them.
        clip_skip = (args.ad_clip_skip - 1 or None) if args.ad_use_clip_skip else plan.clip_skip
        embeds = prompts.encode(pipe, prompt, negative, clip_skip, 1)
        blurred = (
            mask.filter(ImageFilter.GaussianBlur(args.ad_mask_blur)) if args.ad_mask_blur else mask
        )
        steps = args.ad_steps if args.ad_use_steps else request.steps
        fill = MASKED_CONTENT.index(args.ad_inpaint_masked_content)
        kwargs: dict[str, Any] = {
            **embeds,
            "image": fill_masked(image.convert("RGB"), blurred, fill),
            "mask_image": blurred,
            "strength": args.ad_denoising_strength,
            "num_inference_steps": max(steps, math.ceil(1 / max(args.ad_denoising_strength, 1e-3))),
            "guidance_scale": args.ad_cfg_scale if args.ad_use_cfg_scale else request.cfg_scale,
            "generator": seeds.generator(seed),
            # The extension renders the pass at `ad_inpaint_width` x `_height` when asked
            # (the masked crop, or the whole image, scaled to it), else at the image's size.
            "width": args.ad_inpaint_width if args.ad_use_inpaint_width_height else image.width,
            "height": (
                args.ad_inpaint_height if args.ad_use_inpaint_width_height else image.height
            ),
        }
        if args.ad_inpaint_only_masked:
            kwargs["padding_mask_crop"] = args.ad_inpaint_only_masked_padding

        def stop_if_asked(_pipe: Any, _step: int, _t: Any, tensors: dict[str, Any]) -> Any:
            ctx.control.check()  # cancel and the task time limit, between the mask's steps
            return tensors

        kwargs["callback_on_step_end"] = stop_if_asked
        with torch.inference_mode(), scaled_initial_noise(pipe, kit.noise_multiplier):
            result = pipe(**kwargs).images[0].convert("RGB").resize(image.size)
        if kit.restorer is not None:
            from runtime import face_restoration

            # A1111 restores the inpainted sample before pasting it back over the
            # original: faces are restored, then only the masked part is kept.
            name, weight = kit.restorer
            result = face_restoration.restore(
                ctx.models,
                result,
                name,
                weight=weight,
                check=ctx.control.check,
                field_name="ad_restore_face",
            )
        # The original outside the (blurred) mask, bit for bit, as A1111's overlay does.
        return Image.composite(result, image.convert("RGB"), blurred)


def _params(args: ADetailerArgs) -> dict[str, Any]:
    """One pass's infotext fields, under the extension's names (`ADetailerArgs.extra_params`)."""
    params: dict[str, Any] = {
        "ADetailer model": args.ad_model,
        "ADetailer confidence": args.ad_confidence,
        "ADetailer dilate erode": args.ad_dilate_erode,
    }
    if args.ad_mask_min_ratio != 0.0:
        params["ADetailer mask min ratio"] = args.ad_mask_min_ratio
    if args.ad_mask_max_ratio != 1.0:
        params["ADetailer mask max ratio"] = args.ad_mask_max_ratio
    if args.ad_x_offset:
        params["ADetailer x offset"] = args.ad_x_offset
    if args.ad_y_offset:
        params["ADetailer y offset"] = args.ad_y_offset
    if args.ad_mask_bbox_expansion:
        params["ADetailer mask bbox expansion"] = args.ad_mask_bbox_expansion
    if args.ad_mask_merge_invert != "None":
        params["ADetailer mask merge invert"] = args.ad_mask_merge_invert
    params["ADetailer mask blur"] = args.ad_mask_blur
    params["ADetailer denoising strength"] = args.ad_denoising_strength
    params["ADetailer inpaint only masked"] = args.ad_inpaint_only_masked
    if args.ad_inpaint_only_masked:
        params["ADetailer inpaint padding"] = args.ad_inpaint_only_masked_padding
    if args.ad_mask_k:
        params["ADetailer mask only top k"] = args.ad_mask_k
        params["ADetailer method to decide top k masks"] = args.ad_mask_filter_method
    if args.ad_inpaint_masked_content != "original":
        params["ADetailer inpaint masked content"] = args.ad_inpaint_masked_content
    if args.ad_use_inpaint_width_height:
        params["ADetailer use inpaint width height"] = True
        params["ADetailer inpaint width"] = args.ad_inpaint_width
        params["ADetailer inpaint height"] = args.ad_inpaint_height
    if args.ad_use_steps:
        params["ADetailer use separate steps"] = True
        params["ADetailer steps"] = args.ad_steps
    if args.ad_use_cfg_scale:
        params["ADetailer use separate CFG scale"] = True
        params["ADetailer CFG scale"] = args.ad_cfg_scale
    if args.ad_use_checkpoint:
        params["ADetailer use separate checkpoint"] = True
        params["ADetailer checkpoint"] = args.ad_checkpoint
    if args.ad_use_vae:
        params["ADetailer use separate VAE"] = True
        params["ADetailer VAE"] = args.ad_vae
    if args.ad_use_sampler:
        params["ADetailer use separate sampler"] = True
        params["ADetailer sampler"] = args.ad_sampler
        if args.ad_scheduler != "Use same scheduler":
            params["ADetailer scheduler"] = args.ad_scheduler
    if args.ad_use_noise_multiplier:
        params["ADetailer use separate noise multiplier"] = True
        params["ADetailer noise multiplier"] = args.ad_noise_multiplier
    if args.ad_use_clip_skip:
        params["ADetailer use separate CLIP skip"] = True
        params["ADetailer CLIP skip"] = args.ad_clip_skip
    if args.ad_restore_face:
        params["ADetailer restore face"] = True
    for name, label in (
        ("ad_prompt", "prompt"),
        ("ad_prompt_append", "prompt append"),
        ("ad_negative_prompt", "negative prompt"),
        ("ad_negative_prompt_append", "negative prompt append"),
    ):
        if getattr(args, name):
            params[f"ADetailer {label}"] = getattr(args, name)
    return params


def expand_box(
    box: tuple[float, float, float, float], pixels: int, size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """`ad_mask_bbox_expansion`: the detected box grown by `pixels` on every side, inside
    the image (the fork's "expand the detected bounding box before making the mask")."""
    if not pixels:
        return box
    x1, y1, x2, y2 = box
    width, height = size
    return (
        max(0.0, x1 - pixels),
        max(0.0, y1 - pixels),
        min(float(width), x2 + pixels),
        min(float(height), y2 + pixels),
    )


def _check_inpaint_size(args: ADetailerArgs, n: int, settings: Any) -> None:
    width, height = args.ad_inpaint_width, args.ad_inpaint_height
    where = f"ADetailer pass {n + 1} `ad_inpaint_width` x `ad_inpaint_height`"
    if width % 8 or height % 8:
        raise InvalidParameterError(f"{where} must be multiples of 8, got {width}x{height}")
    if width * height > settings.max_pixels:
        raise InvalidParameterError(
            f"{where} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{settings.max_pixels}"
        )


def passes_of(plan: Any) -> list[ADetailerArgs]:
    """The passes that run on this render: `ad_hires_fix_only` ones only after a hires pass
    (a txt2img without `enable_hr` skips them; img2img, which has no hires fix, runs them)."""
    hires = plan.hires is not None or plan.img is not None
    return [
        p for p in parse_args(plan.request.alwayson_scripts) if hires or not p.ad_hires_fix_only
    ]


def _ordinal(n: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(n, f"{n}th")


STAGE = ADetailerStage()
