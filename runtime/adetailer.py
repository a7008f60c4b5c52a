"""ADetailer (`alwayson_scripts.ADetailer`): detect regions, inpaint each one, stage 6.

The extension's API (`adetailer/args.py`, `scripts/!adetailer.py`):
`args` is `[enable, (skip_img2img,) {ad_model, ad_prompt, ...}, {...}, ...]`;
a leading boolean is the switch (`[false]` is a no-op), each object one
detector pass with the extension's defaults (`ADetailerArgs`; unknown keys are
refused, as its `extra=forbid` does). For each finished image and each pass:
detect with `ad_model` (from `adetailer/` in the bucket, `runtime.detectors`),
keep boxes above `ad_confidence` (then `ad_mask_min/max_ratio`,
`ad_mask_k_largest`), turn them into masks dilated by `ad_dilate_erode`
(`ad_mask_merge_invert` merges or inverts them), and inpaint each mask in
turn with the render's own checkpoint: seed + j, `ad_denoising_strength`,
`ad_mask_blur`, `ad_inpaint_only_masked` (+ padding), separate steps / CFG
when `ad_use_steps` / `ad_use_cfg_scale`. Pixels outside the blurred mask are
the original's, exactly. What was found goes into the infotext and
`info.extra_generation_params` (`ADetailer detections`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from runtime.controlnet_units import script_args
from sdeks.errors import InvalidParameterError, ModelNotFoundError

SCRIPT = "adetailer"
VERSION = "sdeks"
MERGE_INVERT = ("None", "Merge", "Merge and Invert")


@dataclass
class ADetailerArgs:
    """One detector pass, with the extension's defaults."""

    ad_model: str = "None"
    ad_model_classes: str = ""
    ad_tap_enable: bool = True
    ad_prompt: str = ""
    ad_negative_prompt: str = ""
    ad_confidence: float = 0.3
    ad_mask_k_largest: int = 0
    ad_mask_min_ratio: float = 0.0
    ad_mask_max_ratio: float = 1.0
    ad_dilate_erode: int = 4
    ad_x_offset: int = 0
    ad_y_offset: int = 0
    ad_mask_merge_invert: str = "None"
    ad_mask_blur: int = 4
    ad_denoising_strength: float = 0.4
    ad_inpaint_only_masked: bool = True
    ad_inpaint_only_masked_padding: int = 32
    ad_use_inpaint_width_height: bool = False
    ad_inpaint_width: int = 512
    ad_inpaint_height: int = 512
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
    ad_controlnet_model: str = "None"
    ad_controlnet_module: str = "None"
    ad_controlnet_weight: float = 1.0
    ad_controlnet_guidance_start: float = 0.0
    ad_controlnet_guidance_end: float = 1.0
    is_api: bool = True

    @property
    def active(self) -> bool:
        return self.ad_model != "None" and self.ad_tap_enable


#: (low, high) of the numeric fields (the extension's pydantic constraints).
_RANGES: dict[str, tuple[float, float]] = {
    "ad_confidence": (0, 1),
    "ad_mask_k_largest": (0, 1000),
    "ad_mask_min_ratio": (0, 1),
    "ad_mask_max_ratio": (0, 1),
    "ad_dilate_erode": (-128, 128),
    "ad_x_offset": (-4096, 4096),
    "ad_y_offset": (-4096, 4096),
    "ad_mask_blur": (0, 64),
    "ad_denoising_strength": (0, 1),
    "ad_inpaint_only_masked_padding": (0, 1024),
    "ad_inpaint_width": (1, 4096),
    "ad_inpaint_height": (1, 4096),
    "ad_steps": (1, 150),
    "ad_cfg_scale": (0, 100),
    "ad_noise_multiplier": (0.5, 1.5),
    "ad_clip_skip": (1, 12),
    "ad_controlnet_weight": (0, 1),
    "ad_controlnet_guidance_start": (0, 1),
    "ad_controlnet_guidance_end": (0, 1),
}
_FIELDS = {f.name: f for f in fields(ADetailerArgs)}
#: Fields that would need features this stage does not have: refused when switched on.
_UNSUPPORTED = {
    "ad_use_checkpoint": "a separate checkpoint",
    "ad_use_vae": "a separate VAE",
    "ad_use_sampler": "a separate sampler",
    "ad_use_noise_multiplier": "a noise multiplier",
    "ad_use_clip_skip": "a separate CLIP skip",
    "ad_restore_face": "face restoration",
}


def parse_args(alwayson_scripts: dict[str, Any]) -> list[ADetailerArgs]:
    """The active passes of the request ([] when ADetailer is off or absent)."""
    found = script_args(alwayson_scripts, SCRIPT)
    if found is None:
        return []
    key, args = found
    where = f"alwayson_scripts.{key}.args"
    if not isinstance(args, list):
        raise InvalidParameterError(f"`{where}` must be a list, got {type(args).__name__}")
    enabled = args[0] if args and isinstance(args[0], bool) else True
    passes = []
    for i, raw in enumerate(args):
        if isinstance(raw, bool):
            if i > 1:
                raise InvalidParameterError(f"`{where}[{i}]` must be an object, got {raw}")
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
    args = ADetailerArgs()
    for name, value in raw.items():
        f = _FIELDS.get(name)
        if f is None:
            raise InvalidParameterError(f"`{where}.{name}` is not an ADetailer field")
        if value is None and name in ("ad_checkpoint", "ad_vae"):
            continue
        default = getattr(args, name)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        else:
            ok = isinstance(value, str) and len(value) <= 4000
        if not ok:
            raise InvalidParameterError(f"`{where}.{name}` has the wrong type: {value!r:.80}")
        low, high = _RANGES.get(name, (None, None))
        if low is not None and high is not None and not low <= value <= high:
            raise InvalidParameterError(
                f"`{where}.{name}` must be between {low:g} and {high:g}, got {value}"
            )
        setattr(args, name, float(value) if isinstance(default, float) else value)
    if args.ad_mask_merge_invert not in MERGE_INVERT:
        raise InvalidParameterError(
            f"`{where}.ad_mask_merge_invert` must be one of {', '.join(MERGE_INVERT)}"
        )
    for name, what in _UNSUPPORTED.items():
        if getattr(args, name) and args.active:
            raise InvalidParameterError(
                f"`{where}.{name}`: {what} is not supported by ADetailer here"
            )
    if args.ad_controlnet_model != "None" and args.active:
        raise InvalidParameterError(
            f"`{where}.ad_controlnet_model`: ControlNet inside ADetailer is not supported here"
        )
    if args.ad_model.lower().startswith("mediapipe"):
        raise InvalidParameterError(
            f"`{where}.ad_model` {args.ad_model!r}: mediapipe detectors are not available; "
            "use a detector file from adetailer/"
        )
    return args


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
    area = size[0] * size[1]

    def box_area(d: Any) -> float:
        x1, y1, x2, y2 = d.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    dets = [
        d for d in dets if args.ad_mask_min_ratio <= box_area(d) / area <= args.ad_mask_max_ratio
    ]
    if args.ad_mask_k_largest:
        dets = sorted(dets, key=box_area, reverse=True)[: args.ad_mask_k_largest]
    return dets


# --- the stage --------------------------------------------------------------------


class ADetailerStage:
    """A `runtime.postprocess` stage."""

    script: str | None = SCRIPT

    def check(self, plan: Any, models: Any, settings: Any) -> None:
        from runtime.detectors import DETECTOR

        for n, args in enumerate(parse_args(plan.request.alwayson_scripts)):
            try:
                models.resolve_weights(DETECTOR, args.ad_model)
            except ModelNotFoundError as exc:
                raise ModelNotFoundError(
                    f"ADetailer pass {n + 1} `ad_model`: {exc.message}"
                ) from exc

    def enabled(self, plan: Any) -> bool:
        return bool(parse_args(plan.request.alwayson_scripts))

    def run(self, images: list[Image.Image], plan: Any, ctx: Any) -> list[Image.Image]:
        from runtime.detectors import DETECTOR

        passes = parse_args(plan.request.alwayson_scripts)
        report: list[str] = []
        out = []
        for i, image in enumerate(images):
            found = []
            for args in passes:
                ctx.control.check()
                with ctx.models.use_weights(DETECTOR, args.ad_model) as lease:
                    dets = lease.model(image.convert("RGB"), args.ad_confidence)
                dets = _filter(dets, args, image.size)
                masks = preprocess_masks(box_masks(image.size, [d.box for d in dets]), args)
                found.append(
                    f"{args.ad_model}: {len(dets)}"
                    + (f" ({', '.join(f'{d.score:.2f}' for d in dets)})" if dets else "")
                )
                seed = plan.plan.all_seeds[i] if i < len(plan.plan.all_seeds) else plan.plan.seed
                for j, mask in enumerate(masks):
                    ctx.control.check()
                    image = self._inpaint(image, mask, args, plan, ctx, seed + j)
            report.append(f"image {i + 1}: " + "; ".join(found))
            out.append(image)
        params = plan.extra_params
        for n, args in enumerate(passes):
            suffix = "" if n == 0 else f" {_ordinal(n + 1)}"
            params[f"ADetailer model{suffix}"] = args.ad_model
            params[f"ADetailer confidence{suffix}"] = args.ad_confidence
            params[f"ADetailer dilate erode{suffix}"] = args.ad_dilate_erode
            params[f"ADetailer mask blur{suffix}"] = args.ad_mask_blur
            params[f"ADetailer denoising strength{suffix}"] = args.ad_denoising_strength
            params[f"ADetailer inpaint only masked{suffix}"] = args.ad_inpaint_only_masked
            if args.ad_inpaint_only_masked:
                params[f"ADetailer inpaint padding{suffix}"] = args.ad_inpaint_only_masked_padding
            if args.ad_prompt:
                params[f"ADetailer prompt{suffix}"] = args.ad_prompt
            if args.ad_negative_prompt:
                params[f"ADetailer negative prompt{suffix}"] = args.ad_negative_prompt
        params["ADetailer detections"] = "; ".join(report)
        params["ADetailer version"] = VERSION
        return out

    def _inpaint(
        self,
        image: Image.Image,
        mask: Image.Image,
        args: ADetailerArgs,
        plan: Any,
        ctx: Any,
        seed: int,
    ) -> Image.Image:
        import torch

        from runtime import prompts, seeds
        from runtime.families import derive

        request = plan.request
        pipe = derive(ctx.pipe, ctx.family, "inpaint")
        pipe.set_progress_bar_config(disable=True)
        prompt = args.ad_prompt.replace("[PROMPT]", plan.prompt) if args.ad_prompt else plan.prompt
        negative = (
            args.ad_negative_prompt.replace("[PROMPT]", plan.negative_prompt)
            if args.ad_negative_prompt
            else plan.negative_prompt
        )
        embeds = prompts.encode(pipe, prompt, negative, plan.clip_skip, 1)
        blurred = (
            mask.filter(ImageFilter.GaussianBlur(args.ad_mask_blur)) if args.ad_mask_blur else mask
        )
        steps = args.ad_steps if args.ad_use_steps else request.steps
        kwargs: dict[str, Any] = {
            **embeds,
            "image": image,
            "mask_image": blurred,
            "strength": args.ad_denoising_strength,
            "num_inference_steps": max(steps, math.ceil(1 / max(args.ad_denoising_strength, 1e-3))),
            "guidance_scale": args.ad_cfg_scale if args.ad_use_cfg_scale else request.cfg_scale,
            "generator": seeds.generator(seed),
            "width": image.width,
            "height": image.height,
        }
        if args.ad_inpaint_only_masked:
            kwargs["padding_mask_crop"] = args.ad_inpaint_only_masked_padding

        def stop_if_asked(_pipe: Any, _step: int, _t: Any, tensors: dict[str, Any]) -> Any:
            ctx.control.check()  # cancel and the task time limit, between the mask's steps
            return tensors

        kwargs["callback_on_step_end"] = stop_if_asked
        with torch.inference_mode():
            result = pipe(**kwargs).images[0].convert("RGB").resize(image.size)
        # The original outside the (blurred) mask, bit for bit, as A1111's overlay does.
        return Image.composite(result, image.convert("RGB"), blurred)


def _ordinal(n: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(n, f"{n}th")


STAGE = ADetailerStage()
