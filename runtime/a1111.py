"""AUTOMATIC1111 request and response bodies (`/sdapi/v1/*`), as pydantic models.

Field names and defaults follow A1111's API (`modules/api/models.py`, the
`StableDiffusionProcessing*` classes), so a body an A1111 client sends means
the same here, and an absent field takes A1111's default. Unknown fields are
ignored as A1111 does; `docs/runtime.md` lists which known fields are honoured.

This module must not import torch: the dispatcher and tests use it cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.builtin_scripts import inert_scripts
from runtime.values import is_unset
from sdeks.envelope import TaskType, requested_model
from sdeks.errors import InvalidParameterError

#: Keys of `alwayson_scripts` that are not scripts: the routing keys (DESIGN.md) and the
#: legacy keys the EKS sample's queue agent reads there (`uid`, `sd_vae`,
#: `override_settings`; its ALWAYSON_SCRIPTS_EXCLUDE_KEYS), accepted on every path.
ROUTING_SCRIPT_KEYS = frozenset(
    {
        "sd_model_checkpoint",
        "task",
        "id_task",
        "uid",
        "save_dir",
        "image_link",
        "runtime",
        "sd_vae",
        "override_settings",
    }
)


def is_no_vae(name: Any) -> bool:
    """Whether an `sd_vae` value means the checkpoint's own VAE ("Automatic", "None", "")."""
    return is_unset(name) or (isinstance(name, str) and name.strip().lower() == "automatic")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class GenerationRequest(_Body):
    """Fields shared by txt2img and img2img."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    #: Old name of `sampler_name`; A1111's API model defaults it to "Euler".
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_alwayson_keys(cls, data: Any) -> Any:
        """The EKS sample's keys in `alwayson_scripts`, read as its queue agent reads them:
        `sd_vae` and an `override_settings` block there are merged into
        `override_settings` (over the body's own), `image_link` without `init_images`
        becomes `init_images` (SNS tasks have it fetched by the dispatcher first)."""
        if not isinstance(data, dict) or not isinstance(data.get("alwayson_scripts"), dict):
            return data
        scripts = data["alwayson_scripts"]
        overrides: dict[str, Any] = {}
        if scripts.get("sd_vae") is not None:
            overrides["sd_vae"] = scripts["sd_vae"]
        if isinstance(scripts.get("override_settings"), dict):
            overrides.update(scripts["override_settings"])
        link = scripts.get("image_link")
        if not overrides and not link:
            return data
        data = dict(data)
        if overrides:
            body_overrides = data.get("override_settings")
            merged = dict(body_overrides) if isinstance(body_overrides, dict) else {}
            data["override_settings"] = {**merged, **overrides}
        if link and not data.get("init_images"):
            data["init_images"] = _links(link)
        return data

    @property
    def sampler(self) -> str:
        """The sampler asked for, as A1111 reads it: `sampler_name or sampler_index`."""
        return self.sampler_name or self.sampler_index

    def requested_checkpoint(self) -> str | None:
        """The checkpoint this request names, by the rule the dispatcher schedules with
        (`sdeks.envelope.requested_model`: `alwayson_scripts`, then `override_settings`).

        Both blocks are free-form dicts, so a non-string `sd_model_checkpoint` gets
        this far: it is refused, never read as absent or turned into a string.
        """
        blocks = {
            "alwayson_scripts": self.alwayson_scripts,
            "override_settings": self.override_settings or {},
        }
        for section, block in blocks.items():
            value = block.get("sd_model_checkpoint")
            if value is not None and not isinstance(value, str):
                raise InvalidParameterError(
                    f"`{section}.sd_model_checkpoint` must be a string, got {value!r}"
                )
        return requested_model(blocks)

    @property
    def script_alwayson(self) -> dict[str, Any]:
        """`alwayson_scripts` without the routing keys, i.e. real script arguments."""
        return {k: v for k, v in self.alwayson_scripts.items() if k not in ROUTING_SCRIPT_KEYS}


def _links(link: Any) -> Any:
    """`image_link`: one image, or the sample's comma-separated URLs."""
    if isinstance(link, str) and "://" in link and not link.startswith("data:"):
        return [part.strip() for part in link.split(",") if part.strip()]
    return link if isinstance(link, list) else [link]


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = None
    #: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale).
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    #: 0 fill, 1 original, 2 latent noise, 3 latent nothing.
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ExtrasBaseRequest(_Body):
    """Fields shared by `/extra-single-image` and `/extra-batch-images`."""

    #: 0 scale by `upscaling_resize`, 1 scale to `upscaling_resize_w` x `_h`.
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class FileData(_Body):
    """One image of `/extra-batch-images` (`data`: base64, `name`: the client's file name)."""

    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(default_factory=list)  # A1111 spells it so


# --- responses ---------------------------------------------------------------


class ImageResponse(BaseModel):
    """txt2img / img2img answer: `info` is a JSON *string*, as in A1111."""

    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str] = Field(default_factory=list)


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class PngInfoRequest(_Body):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


# --- parsing ---------------------------------------------------------------

_REQUEST_FOR_TASK: dict[TaskType, type[_Body]] = {
    TaskType.TEXT_TO_IMAGE: Txt2ImgRequest,
    TaskType.IMAGE_TO_IMAGE: Img2ImgRequest,
    TaskType.EXTRA_SINGLE_IMAGE: ExtrasSingleImageRequest,
    TaskType.EXTRA_BATCH_IMAGES: ExtrasBatchImagesRequest,
}


def parse_request(tasktype: TaskType, content: dict[str, Any]) -> _Body:
    """The A1111 body for `tasktype`, or `InvalidParameterError` naming the bad field."""
    model = _REQUEST_FOR_TASK[tasktype]
    try:
        return model.model_validate(content)
    except ValidationError as exc:
        raise InvalidParameterError(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        value = err.get("input")
        shown = json.dumps(value, default=str)[:80] if value is not None else "null"
        parts.append(f"`{where}` {err['msg'].removeprefix('Value error, ').lower()}, got {shown}")
    return "; ".join(parts)


def known_fields(tasktype: TaskType) -> frozenset[str]:
    """Every top-level field the A1111 request model of `tasktype` reads, by name and
    alias: derived from the models, so a field added to them is known at once."""
    model = _REQUEST_FOR_TASK.get(tasktype)
    if model is None:
        return frozenset()
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for alias in (info.alias, info.validation_alias):
            if isinstance(alias, str):
                names.add(alias)
    return frozenset(names)


def ignored_fields(
    tasktype: TaskType, content: dict[str, Any], scripts: Iterable[str] | None = None
) -> list[str]:
    """Top-level `content` fields the request model of `tasktype` does not know (a
    misspelled `promt`): kept out of the render, as A1111 does, but reported in the
    manifest, the callback and by the CLI. Empty for a task type without a model here.

    With `scripts` (the `alwayson_scripts` names the runtime reads), also
    `alwayson_scripts.<name>` for each other script sent switched off or empty
    (`runtime.builtin_scripts.is_inert`): a no-op, not an error."""
    known = known_fields(tasktype)
    if not known:
        return []
    ignored = sorted(str(key) for key in content if key not in known)
    block = content.get("alwayson_scripts")
    if scripts is not None and isinstance(block, dict):
        real = {k: v for k, v in block.items() if k not in ROUTING_SCRIPT_KEYS}
        ignored += [f"alwayson_scripts.{k}" for k in inert_scripts(real, scripts)]
    return ignored
