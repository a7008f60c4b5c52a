"""ControlNet units as the sd-webui-controlnet extension's API takes them (pure: no torch).

`alwayson_scripts.controlnet.args` (or `ControlNet`: A1111 matches script
titles case-insensitively) is a list of units, one dict each. Field names,
defaults and value spellings follow the extension's `ControlNetUnit`
(`internal_controlnet/args.py`, `scripts/enums.py`):

- `enabled` defaults to true, as in the released extension (its API units
  without the field run; see the extension's PR #2912).
- `resize_mode`: "Just Resize", "Crop and Resize" (default), "Resize and Fill",
  the older "Inner Fit (Scale to Fit)" / "Outer Fit (Shrink to Fit)" /
  "Scale to Fit (Inner Fit)" / "Envelope (Outer Fit)", or 0/1/2 (3 = 0).
- `control_mode`: "Balanced" (default), "My prompt is more important",
  "ControlNet is more important", or 0/1/2.
- `weight` 0..2, `guidance_start` <= `guidance_end` in 0..1; `processor_res`,
  `threshold_a`, `threshold_b` of -1 (or out of the module's range) take the
  module's default, as the extension's bound check does.
- Old aliases: `input_image` (image), `guidance` (guidance_end), `lowvram`
  (low_vram), `mask_image` (mask). Older clients (webuiapi) send an alias and
  its new name together; as in the extension, the new name wins when it is
  set (not None) and the alias is dropped; an alias alone is used.
- `image`: base64 (or a link the dispatcher has resolved to base64),
  `{"image": ..., "mask": ...}`, or `[image, mask]`; `""` means no image
  (img2img: the init image), as for the extension's UI units.
- Booleans and numbers are read leniently, as the extension's pydantic unit
  does (`"true"`, `0`/`1`, `"0.5"`: `runtime.values`).

Unlike the extension, a bad value is refused with the field named
(`alwayson_scripts.controlnet.args[1].weight ...`) instead of logged and
replaced: "validate, don't fix up" (STYLE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from runtime.values import lax_bool, lax_index, lax_number
from sdeks.errors import InvalidParameterError

#: The `alwayson_scripts` key (lower-cased) the units come under.
SCRIPT = "controlnet"
#: The most units one request may carry (the extension's UI default is 3).
MAX_UNITS = 8

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
    "Just Resize (Latent upscale)": "Just Resize",
}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
_ALIASES = {
    "input_image": "image",
    "guidance": "guidance_end",
    "lowvram": "low_vram",
    "mask_image": "mask",
}
#: Image fields where `""` means "no image".
_IMAGE_FIELDS = ("image", "input_image", "mask", "mask_image")
#: Fields of the extension's unit that are accepted and have no effect here.
ACCEPTED_WITHOUT_EFFECT = (
    "low_vram",
    "save_detected_map",
    "inpaint_crop_input_image",
    "is_ui",
    "input_mode",
    "batch_images",
    "output_dir",
    "loopback",
)


@dataclass
class ControlNetUnit:
    """One unit, checked; `index` is its position in `args` (for messages and infotext)."""

    index: int
    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    #: The control image as sent (base64 string), or None (img2img: the init image).
    image: str | None = None
    mask: str | None = None
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"
    advanced_weighting: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def resize_mode_int(self) -> int:
        return RESIZE_MODES.index(self.resize_mode)

    @property
    def active(self) -> bool:
        """Enabled and with an effect: a unit of weight 0 adds exactly nothing."""
        return self.enabled and self.weight > 0

    def infotext(self) -> str:
        """The unit as the extension writes it into the infotext (`ControlNetUnit.serialize`)."""
        values = {
            "Module": self.module,
            "Model": self.model,
            "Weight": _num(self.weight),
            "Resize Mode": self.resize_mode,
            "Processor Res": str(self.processor_res),
            "Threshold A": _num(self.threshold_a),
            "Threshold B": _num(self.threshold_b),
            "Guidance Start": _num(self.guidance_start),
            "Guidance End": _num(self.guidance_end),
            "Pixel Perfect": str(self.pixel_perfect),
            "Control Mode": self.control_mode,
        }
        # The extension drops the whole unit text when a value would break the format.
        if any("," in v or ":" in v for v in values.values()):
            return ""
        return ", ".join(f"{k}: {v}" for k, v in values.items())


def _num(value: float) -> str:
    """Floats as the extension prints them (`str()` of a pydantic float): 1.0, 0.5, -1.0."""
    return str(float(value))


def script_args(alwayson_scripts: dict[str, Any], script: str) -> tuple[str, Any] | None:
    """(the key as sent, its `args`) for `script`, matched case-insensitively; None when absent."""
    for key, value in alwayson_scripts.items():
        if key.lower() == script:
            if isinstance(value, dict):
                return key, value.get("args", [])
            if isinstance(value, list):
                return key, value  # some clients send the list bare
            raise InvalidParameterError(
                f"`alwayson_scripts.{key}` must be an object with `args`, got {type(value).__name__}"
            )
    return None


def parse_units(alwayson_scripts: dict[str, Any]) -> list[ControlNetUnit]:
    """Every unit of the request (disabled ones included), checked; [] when there is none."""
    found = script_args(alwayson_scripts, SCRIPT)
    if found is None:
        return []
    key, args = found
    where = f"alwayson_scripts.{key}.args"
    if args is None:
        return []
    if not isinstance(args, list):
        raise InvalidParameterError(f"`{where}` must be a list of units, got {type(args).__name__}")
    if args and args[0] is False:
        return []  # A1111's convention for a script switched off: `args[0]` false
    if len(args) > MAX_UNITS:
        raise InvalidParameterError(
            f"`{where}` holds {len(args)} units, over the limit of {MAX_UNITS}"
        )
    units = []
    for i, raw in enumerate(args):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise InvalidParameterError(
                f"`{where}[{i}]` must be a unit object, got {type(raw).__name__}"
            )
        units.append(parse_unit(raw, i, f"{where}[{i}]"))
    return units


def parse_unit(raw: dict[str, Any], index: int, where: str) -> ControlNetUnit:
    values = dict(raw)
    for name in _IMAGE_FIELDS:
        if values.get(name) == "":
            values[name] = None
    for alias, name in _ALIASES.items():
        if alias in values:
            old = values.pop(alias)
            # The extension keeps the new field when both are sent (older webuiapi
            # sends `guidance` beside `guidance_start`/`guidance_end`).
            if values.get(name) is None:
                values[name] = old

    unit = ControlNetUnit(index=index)
    unit.enabled = _bool(values, "enabled", True, where)
    unit.module = _str(values, "module", "none", where)
    unit.model = _str(values, "model", "None", where)
    unit.weight = _float(values, "weight", 1.0, where, 0.0, 2.0)
    unit.image, unit.mask = _image(values.get("image"), values.get("mask"), where)
    unit.resize_mode = resize_mode_of(values.get("resize_mode", "Crop and Resize"), where)
    unit.low_vram = _bool(values, "low_vram", False, where)
    unit.processor_res = int(_float(values, "processor_res", -1, where, integer=True))
    unit.threshold_a = _float(values, "threshold_a", -1, where)
    unit.threshold_b = _float(values, "threshold_b", -1, where)
    unit.guidance_start = _float(values, "guidance_start", 0.0, where, 0.0, 1.0)
    unit.guidance_end = _float(values, "guidance_end", 1.0, where, 0.0, 1.0)
    if unit.guidance_start > unit.guidance_end:
        raise InvalidParameterError(
            f"`{where}.guidance_start` ({unit.guidance_start}) is greater than "
            f"`guidance_end` ({unit.guidance_end})"
        )
    unit.pixel_perfect = _bool(values, "pixel_perfect", False, where)
    unit.control_mode = _choice(
        values.get("control_mode", "Balanced"), CONTROL_MODES, f"{where}.control_mode"
    )
    unit.hr_option = _choice(values.get("hr_option", "Both"), HR_OPTIONS, f"{where}.hr_option")
    weighting = values.get("advanced_weighting")
    if weighting is not None:
        if not isinstance(weighting, list) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
            for w in weighting
        ):
            raise InvalidParameterError(f"`{where}.advanced_weighting` must be a list of numbers")
        unit.advanced_weighting = [float(w) for w in weighting]
    unit.extra = {k: v for k, v in values.items() if k in ACCEPTED_WITHOUT_EFFECT}
    return unit


def resize_mode_of(value: Any, where: str) -> str:
    value = lax_index(value)
    if isinstance(value, bool):
        raise InvalidParameterError(f"`{where}.resize_mode` must be a name or 0..2, got {value}")
    if isinstance(value, int):
        if value == 3:
            return "Just Resize"
        if 0 <= value < len(RESIZE_MODES):
            return RESIZE_MODES[value]
    elif isinstance(value, str):
        name = _RESIZE_ALIASES.get(value, value)
        if name in RESIZE_MODES:
            return name
    raise InvalidParameterError(
        f"`{where}.resize_mode` must be one of {', '.join(map(repr, RESIZE_MODES))} or 0..2, "
        f"got {value!r:.80}"
    )


def _choice(value: Any, names: tuple[str, ...], where: str) -> str:
    value = lax_index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and value in names:
        return value
    raise InvalidParameterError(
        f"`{where}` must be one of {', '.join(map(repr, names))} or 0..{len(names) - 1}, "
        f"got {value!r:.80}"
    )


def _bool(values: dict[str, Any], name: str, default: bool, where: str) -> bool:
    value = values.get(name, default)
    if value is None:
        return default
    return lax_bool(value, f"{where}.{name}")


def _str(values: dict[str, Any], name: str, default: str, where: str) -> str:
    value = values.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > 300:
        raise InvalidParameterError(f"`{where}.{name}` must be a name, got {value!r:.80}")
    return value.strip()


def _float(
    values: dict[str, Any],
    name: str,
    default: float,
    where: str,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
) -> float:
    value = values.get(name, default)
    if value is None:
        return default
    return lax_number(value, f"{where}.{name}", integer=integer, low=low, high=high)


def _image(image: Any, mask: Any, where: str) -> tuple[str | None, str | None]:
    """(image, mask) from the forms the extension accepts."""
    if isinstance(image, list):
        if len(image) == 1 and isinstance(image[0], dict):
            image = image[0]
        elif len(image) == 2 and all(isinstance(v, str) for v in image):
            image, mask = image
        else:
            raise InvalidParameterError(
                f"`{where}.image` must be an image, {{image, mask}} or [image, mask] "
                "(one input image per unit)"
            )
    if isinstance(image, dict):
        if mask is not None and image.get("mask") not in (None, ""):
            raise InvalidParameterError(f"`{where}` has a mask both in `image` and in `mask`")
        image, mask = image.get("image"), image.get("mask", mask)
    image, mask = (None if v == "" else v for v in (image, mask))
    for name, value in (("image", image), ("mask", mask)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidParameterError(
                f"`{where}.{name}` must be a base64 image or a link, got {type(value).__name__}"
            )
    if image is None and mask is not None:
        raise InvalidParameterError(f"`{where}.mask` is given without an `image`")
    return image or None, mask or None
