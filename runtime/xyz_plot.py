"""The "X/Y/Z plot" script (A1111's `scripts/xyz_grid.py`): one render per cell, a grid.

`script_args` is A1111's positional layout (the script's `ui()` order):

    0 x_type  1 x_values  2 x_values_dropdown
    3 y_type  4 y_values  5 y_values_dropdown
    6 z_type  7 z_values  8 z_values_dropdown
    9 draw_legend  10 include_lone_images  11 include_sub_grids  12 no_fixed_seeds
    then, by A1111 version: margin_size[, csv_mode[, raw_mode]]
                        or: vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode

An axis type is A1111's index into its axis list for txt2img or img2img (the
list differs between the two), or the axis label ("Seed", "CFG Scale", ...).
Values are A1111's: comma-separated (CSV quoting), integer/float ranges
`1-5`, `1-9 (+2)`, `1-10 [4]`, or the dropdown list for axes with choices.

Result, as A1111 returns it: the grid image first (its infotext: the first
cell's plus `Script`, `X Type`, `X Values`, ... fields), then, with
`include_lone_images` (default true when absent), each cell's first image
with its own infotext, cells in x, then y, then z order.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from runtime import infotext
from runtime.stages.types import RenderResult
from sdeks.errors import InvalidParameterError

if TYPE_CHECKING:
    from runtime.a1111 import GenerationRequest, Img2ImgRequest
    from runtime.control import JobControl
    from runtime.render import Renderer


@dataclass(frozen=True)
class Axis:
    label: str
    type: type
    #: The request fields one value sets (None: `apply` handles it).
    apply: Callable[[dict[str, Any], Any, list[Any], GenerationRequest], None] | None
    #: Only in A1111's txt2img (False) or img2img (True) list; None: both.
    img2img: bool | None = None
    choices: bool = False
    supported: bool = True


def _field(name: str) -> Callable[[dict[str, Any], Any, list[Any], Any], None]:
    def apply(update: dict[str, Any], value: Any, _values: list[Any], _req: Any) -> None:
        update[name] = value

    return apply


def _override(name: str) -> Callable[[dict[str, Any], Any, list[Any], Any], None]:
    def apply(update: dict[str, Any], value: Any, _values: list[Any], req: Any) -> None:
        overrides = dict(update.get("override_settings") or req.override_settings or {})
        overrides[name] = value
        update["override_settings"] = overrides

    return apply


def _prompt_sr(update: dict[str, Any], value: Any, values: list[Any], req: Any) -> None:
    search = values[0]
    prompt = update.get("prompt", req.prompt)
    negative = update.get("negative_prompt", req.negative_prompt)
    if search not in prompt and search not in negative:
        raise InvalidParameterError(
            f"`script_args` Prompt S/R did not find {search!r} in prompt or negative prompt"
        )
    update["prompt"] = prompt.replace(search, value)
    update["negative_prompt"] = negative.replace(search, value)
    hr_prompt = getattr(req, "hr_prompt", "")
    if hr_prompt:
        update["hr_prompt"] = hr_prompt.replace(search, value)


def _styles(update: dict[str, Any], value: Any, _values: list[Any], req: Any) -> None:
    update["styles"] = [*(req.styles or []), *[s.strip() for s in str(value).split(",")]]


def _refiner(update: dict[str, Any], value: Any, _values: list[Any], _req: Any) -> None:
    update["refiner_checkpoint"] = None if value == "None" else value


def _unsupported(label: str, img2img: bool | None = None) -> Axis:
    return Axis(label, str, None, img2img, supported=False)


#: A1111's `axis_options`, in its order (indices count after filtering by txt2img/img2img).
AXES: list[Axis] = [
    Axis("Nothing", str, None),
    Axis("Seed", int, _field("seed")),
    Axis("Var. seed", int, _field("subseed")),
    Axis("Var. strength", float, _field("subseed_strength")),
    Axis("Steps", int, _field("steps")),
    Axis("Hires steps", int, _field("hr_second_pass_steps"), img2img=False),
    Axis("CFG Scale", float, _field("cfg_scale")),
    _unsupported("Image CFG Scale", img2img=True),
    Axis("Prompt S/R", str, _prompt_sr),
    _unsupported("Prompt order"),
    Axis("Sampler", str, _field("sampler_name"), img2img=False, choices=True),
    Axis("Hires sampler", str, _field("hr_sampler_name"), img2img=False, choices=True),
    Axis("Sampler", str, _field("sampler_name"), img2img=True, choices=True),
    Axis("Checkpoint name", str, None, choices=True),
    _unsupported("Negative Guidance minimum sigma"),
    _unsupported("Sigma Churn"),
    _unsupported("Sigma min"),
    _unsupported("Sigma max"),
    _unsupported("Sigma noise"),
    Axis("Schedule type", str, _field("scheduler"), choices=True),
    _unsupported("Schedule min sigma"),
    _unsupported("Schedule max sigma"),
    _unsupported("Schedule rho"),
    Axis("Eta", float, _field("eta")),
    Axis("Clip skip", int, _override("CLIP_stop_at_last_layers")),
    Axis("Denoising", float, _field("denoising_strength")),
    _unsupported("Initial noise multiplier"),
    _unsupported("Extra noise"),
    Axis("Hires upscaler", str, _field("hr_upscaler"), img2img=False, choices=True),
    _unsupported("Cond. Image Mask Weight", img2img=True),
    Axis("VAE", str, _override("sd_vae"), choices=True),
    Axis("Styles", str, _styles, choices=True),
    _unsupported("UniPC Order"),
    _unsupported("Face restore"),
    _unsupported("Token merging ratio"),
    _unsupported("Token merging ratio high-res"),
    _unsupported("Always discard next-to-last sigma"),
    _unsupported("SGM noise multiplier"),
    Axis("Refiner checkpoint", str, _refiner, choices=True),
    Axis("Refiner switch at", float, _field("refiner_switch_at")),
    _unsupported("RNG source"),
]

_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_RANGE_F = re.compile(
    r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*"
)
_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_COUNT_F = re.compile(
    r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*"
)
#: Values one axis may have (a guard against `1-1000000`).
MAX_AXIS_VALUES = 64


def axes_for(kind: str) -> list[Axis]:
    img2img = kind == "img2img"
    return [a for a in AXES if a.img2img is None or a.img2img == img2img]


def _axis(value: Any, kind: str, name: str) -> Axis:
    options = axes_for(kind)
    if value is None or value == "":
        return options[0]
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        for axis in options:
            if axis.label.lower() == value.strip().lower():
                break
        else:
            raise InvalidParameterError(
                f"`script_args` {name} {value!r} is not an X/Y/Z plot axis type"
            )
    else:
        try:
            index = int(value)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(
                f"`script_args` {name} must be an axis index or label, got {value!r:.80}"
            ) from exc
        if not 0 <= index < len(options):
            raise InvalidParameterError(
                f"`script_args` {name} {index} is not an X/Y/Z plot axis for {kind} "
                f"(0..{len(options) - 1})"
            )
        axis = options[index]
    if not axis.supported:
        supported = ", ".join(a.label for a in options if a.supported)
        raise InvalidParameterError(
            f"`script_args` {name}: X/Y/Z plot axis {axis.label!r} is not supported; "
            f"supported axes: {supported}"
        )
    return axis


def _csv_list(text: str) -> list[str]:
    return [v.strip() for row in csv.reader(io.StringIO(text)) for v in row]


def _values(axis: Axis, text: Any, dropdown: Any, csv_mode: bool, name: str) -> list[Any]:
    if axis.label == "Nothing":
        return [0]
    if axis.choices and not csv_mode and isinstance(dropdown, list) and dropdown:
        raw: list[Any] = [str(v) for v in dropdown]
    elif isinstance(text, list):
        raw = [str(v) for v in text]
    else:
        raw = _csv_list(str(text or ""))
    values: list[Any] = []
    for val in raw:
        try:
            count, make = _expand(axis, val)
        except (ValueError, OverflowError) as exc:  # past int()'s digit limit, inf, huge len
            raise InvalidParameterError(
                f"`script_args` {name} value {val!r:.80} is not a usable range"
            ) from exc
        if len(values) + count > MAX_AXIS_VALUES:
            raise InvalidParameterError(
                f"`script_args` {name} has more than {MAX_AXIS_VALUES} values"
            )
        values.extend(make())
    try:
        typed = [axis.type(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(
            f"`script_args` {name} values for {axis.label!r} must be {axis.type.__name__}s, "
            f"got {raw!r:.120}"
        ) from exc
    if not typed:
        raise InvalidParameterError(f"`script_args` {name} has no values for {axis.label!r}")
    return typed


def _int(text: str) -> int:
    return int(text.replace(" ", ""))  # the patterns allow `- 5`


def _float(text: str) -> float:
    return float(text.replace(" ", ""))


def _expand(axis: Axis, val: str) -> tuple[int, Callable[[], list[Any]]]:
    """One comma-separated item as A1111 expands it (`a-b`, `a-b (+step)`, `a-b [count]`):
    how many values it makes, counted arithmetically, and how to make them, so an
    item like `1-1000000000` is refused before any list exists."""
    if axis.type is int and (m := _RANGE.fullmatch(val)):
        step = _int(m.group(3)) if m.group(3) else 1
        span = range(_int(m.group(1)), _int(m.group(2)) + 1, step or 1)
        return len(span), lambda: list(span)  # len() of a range does not build it
    if axis.type is int and (mc := _COUNT.fullmatch(val)):
        num = _int(mc.group(3)) if mc.group(3) else 1
        return _linspace(_int(mc.group(1)), _int(mc.group(2)), num, int)
    if axis.type is float and (m := _RANGE_F.fullmatch(val)):
        start, end = _float(m.group(1)), _float(m.group(2))
        fstep = _float(m.group(3)) if m.group(3) else 1.0
        count = 1
        if fstep > 0:
            count = max(1, math.floor((end - start) / fstep + 1e-9) + 1)  # inf: OverflowError
        return count, lambda: [start + i * fstep for i in range(count)]
    if axis.type is float and (mc := _COUNT_F.fullmatch(val)):
        num = int(_float(mc.group(3))) if mc.group(3) else 1
        return _linspace(_float(mc.group(1)), _float(mc.group(2)), num, float)
    return 1, lambda: [val]


def _linspace(
    start: float, stop: float, num: int, cast: type
) -> tuple[int, Callable[[], list[Any]]]:
    """A1111's `np.linspace(start, stop, num)` as (count, make)."""
    if num <= 1:
        return 1, lambda: [cast(start)]
    return num, lambda: [cast(start + (stop - start) * i / (num - 1)) for i in range(num)]


def _label(axis: Axis, value: Any) -> str:
    if axis.label == "Nothing":
        return ""
    if axis.label == "Prompt S/R":
        return str(value)
    return f"{axis.label}: {value:g}" if isinstance(value, float) else f"{axis.label}: {value}"


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """A1111 `images.image_grid`: `rows` rows, filled left to right."""
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, image in enumerate(images):
        grid.paste(image, (i % cols * w, i // cols * h))
    return grid


def draw_legend(
    grid: Image.Image, w: int, h: int, x_labels: list[str], y_labels: list[str], margin: int
) -> Image.Image:
    """Column labels above and row labels left of the grid (A1111's `draw_grid_annotations`)."""
    if not any(x_labels) and not any(y_labels):
        return grid
    top = 24 if any(x_labels) else 0
    left = max((len(t) for t in y_labels), default=0) * 6 + 8 if any(y_labels) else 0
    out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(x_labels):
        draw.text((left + i * (w + margin) + 4, 6), text, fill="black")
    for j, text in enumerate(y_labels):
        draw.text((4, top + j * (h + margin) + h // 2 - 5), text, fill="black")
    return out


def _with_fields(text: str, fields: Mapping[str, Any]) -> str:
    """`text` (an infotext) with `fields` added before `Version`, as A1111's extra params are."""
    extra = ", ".join(f"{k}: {infotext.quote(v)}" for k, v in fields.items() if v is not None)
    if not extra:
        return text
    head, sep, last = text.rpartition("\n")
    marker = ", Version: "
    if marker in last:
        last = last.replace(marker, f", {extra}{marker}", 1)
    else:
        last = f"{last}, {extra}"
    return f"{head}{sep}{last}"


class XYZPlot:
    title = "X/Y/Z plot"
    kinds: tuple[str, ...] = ("txt2img", "img2img")

    def run(
        self,
        renderer: Renderer,
        request: GenerationRequest,
        img: Img2ImgRequest | None,
        *,
        options: Mapping[str, Any],
        model: str | None,
        control: JobControl,
    ) -> RenderResult:
        kind = "img2img" if img is not None else "txt2img"
        args = list(request.script_args or [])
        args += [None] * max(0, 13 - len(args))

        def flag(value: Any, default: bool) -> bool:
            return default if value is None else bool(value)

        rest = args[13:]
        if rest and isinstance(rest[0], bool):  # A1111 1.8+: vary_seeds_x/y/z first
            margin, csv_mode = (rest[3:4] or [0])[0], flag((rest[4:5] or [None])[0], False)
        else:
            margin, csv_mode = (rest[0:1] or [0])[0], flag((rest[1:2] or [None])[0], False)
        try:
            margin = max(0, min(int(margin or 0), 200))
        except (TypeError, ValueError):
            margin = 0
        legend = flag(args[9], True)
        lone = flag(args[10], True)
        no_fixed_seeds = flag(args[12], False)
        axes = [_axis(args[i * 3], kind, f"{n}_type") for i, n in enumerate("xyz")]
        values = [
            _values(axis, args[i * 3 + 1], args[i * 3 + 2], csv_mode, f"{n}_values")
            for i, (axis, n) in enumerate(zip(axes, "xyz", strict=True))
        ]
        base = request.model_copy(update={"script_name": None, "script_args": []})
        if not no_fixed_seeds:
            # A1111 fix_seed: one random seed for every cell, and for -1 seed values.
            if base.seed == -1:
                base = base.model_copy(update={"seed": random.randrange(4294967294)})
            if base.subseed == -1:
                base = base.model_copy(update={"subseed": random.randrange(4294967294)})
            for i, axis in enumerate(axes):
                if axis.label in ("Seed", "Var. seed"):
                    values[i] = [
                        random.randrange(4294967294) if v in (None, "", -1) else v
                        for v in values[i]
                    ]
        xs, ys, zs = values
        cells = len(xs) * len(ys) * len(zs)
        settings = renderer.settings
        if cells * request.batch_size * request.n_iter > settings.max_images:
            raise InvalidParameterError(
                f"`script_args` X/Y/Z plot has {cells} cells of {request.batch_size * request.n_iter}"
                f" images, over the limit of {settings.max_images} images"
            )

        results: dict[tuple[int, int, int], RenderResult] = {}
        for iz, z in enumerate(zs):
            for iy, y in enumerate(ys):
                for ix, x in enumerate(xs):
                    control.check()
                    cell_request, cell_model = base, model
                    update: dict[str, Any] = {}
                    for axis, value, vals in zip(axes, (x, y, z), values, strict=True):
                        if axis.label == "Checkpoint name":
                            cell_model = value
                        elif axis.apply is not None:
                            axis.apply(update, value, vals, base)
                    if update:
                        cell_request = type(base).model_validate({**base.model_dump(), **update})
                    cell_img = cell_request if img is not None else None
                    results[(ix, iy, iz)] = renderer.generate(
                        cell_request,  # type: ignore[arg-type]
                        cell_img,  # type: ignore[arg-type]
                        options=options,
                        model=cell_model,
                        control=control,
                    )
        result = self._assemble(axes, values, args, results, legend, lone, margin)
        result.parameters = request.model_dump(exclude={"init_images", "mask"})
        return result

    def _assemble(
        self,
        axes: list[Axis],
        values: list[list[Any]],
        args: list[Any],
        results: dict[tuple[int, int, int], RenderResult],
        legend: bool,
        lone: bool,
        margin: int,
    ) -> RenderResult:
        xs, ys, zs = values
        order = [
            (ix, iy, iz) for iz in range(len(zs)) for iy in range(len(ys)) for ix in range(len(xs))
        ]
        first = results[order[0]]
        cells = [results[k].images[0] for k in order]
        w, h = cells[0].size
        cells = [c if c.size == (w, h) else c.resize((w, h)) for c in cells]
        grids = []
        for iz in range(len(zs)):
            chunk = cells[iz * len(xs) * len(ys) : (iz + 1) * len(xs) * len(ys)]
            grid = image_grid(chunk, rows=len(ys))
            if legend:
                grid = draw_legend(
                    grid,
                    w,
                    h,
                    [_label(axes[0], v) for v in xs],
                    [_label(axes[1], v) for v in ys],
                    margin,
                )
            grids.append(grid)
        grid = grids[0] if len(grids) == 1 else image_grid(grids, rows=1)
        fields: dict[str, Any] = {"Script": self.title}
        for i, name in enumerate("XYZ"):
            axis = axes[i]
            if axis.label == "Nothing":
                continue
            fields[f"{name} Type"] = axis.label
            given = args[i * 3 + 1]
            shown = given if isinstance(given, str) and given else ", ".join(map(str, values[i]))
            fields[f"{name} Values"] = shown
            if axis.label in ("Seed", "Var. seed"):
                fields[f"Fixed {name} Values"] = ", ".join(str(v) for v in values[i])
        grid_text = _with_fields(first.infotexts[0], fields)
        images = [grid] + (cells if lone else [])
        texts = [grid_text] + ([results[k].infotexts[0] for k in order] if lone else [])
        cell_seeds = [results[k].seeds[0] if results[k].seeds else 0 for k in order]
        info = dict(first.info)
        info.update(
            all_prompts=[results[k].info.get("prompt") for k in order],
            all_seeds=cell_seeds,
            infotexts=texts,
            index_of_first_image=1,
        )
        return RenderResult(
            images=images,
            infotexts=texts,
            info=info,
            parameters=first.parameters,
            seeds=[cell_seeds[0]] + (cell_seeds if lone else []),
            model=first.model,
            model_load_ms=sum(r.model_load_ms for r in results.values()),
        )


XYZ_PLOT = XYZPlot()
