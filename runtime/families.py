"""Model families (SD 1.x, SD 2.x, SDXL): detection and pipeline classes.

Detection is pure: it looks at a single file's tensor names and shapes (read
from the safetensors header, so an S3 object can be classified from its first
kilobytes) or at a diffusers folder's `model_index.json` and component
configs. Nothing here imports torch at import time; `pipeline_class` and
`derive` import diffusers when called.

Signals used, strongest first (they mirror how A1111 and
`diffusers.loaders.single_file_utils` tell the checkpoints apart):

- SDXL: a second text encoder (`conditioner.embedders.1` in a single file,
  `text_encoder_2` in a folder) or a UNet conditioned on `text_time`.
- SD 2.x: an OpenCLIP text encoder (`cond_stage_model.model.*`; in a folder a
  text encoder with plain `gelu`, OpenAI CLIP uses `quick_gelu`), or 1024-wide
  cross-attention.
- SD 1.x: the OpenAI CLIP text encoder (`cond_stage_model.transformer.*`).
- Inpainting variants: 9 UNet input channels (latents + mask + masked image).
- The SDXL refiner (stabilityai's `sd_xl_refiner_1.0` architecture): SDXL
  with the OpenCLIP encoder alone (`conditioner.embedders.0.model.*` and no
  second embedder in a single file; no `text_encoder` but a `text_encoder_2`,
  or `requires_aesthetics_score`, in a folder). Its pipeline class is
  `StableDiffusionXLImg2ImgPipeline` for every kind, the class that knows its
  aesthetic-score time ids; it serves as `refiner_checkpoint` only.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdeks.errors import ModelLoadError

FamilyName = Literal["sd1", "sd2", "sdxl"]
PipelineKind = Literal["txt2img", "img2img", "inpaint"]
PIPELINE_KINDS: tuple[PipelineKind, ...] = ("txt2img", "img2img", "inpaint")

#: diffusers pipeline class names per family and kind.
PIPELINES: dict[FamilyName, dict[PipelineKind, str]] = {
    "sd1": {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    },
    "sd2": {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    },
    "sdxl": {
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
}

_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_V2_ATTN2_K = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"

#: A safetensors header larger than this is not a checkpoint (real SDXL: ~200 KB).
MAX_HEADER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Family:
    name: FamilyName
    #: UNet takes 9 input channels (a dedicated inpainting checkpoint).
    inpainting: bool = False
    #: The SDXL refiner architecture (OpenCLIP only, aesthetic-score time ids).
    refiner: bool = False

    @property
    def config_name(self) -> str:
        """The shared config folder's name for its single files (`configs/<name>/`)."""
        return "sdxl_refiner" if self.refiner else self.name

    @property
    def label(self) -> str:
        """What logs and `/sd-models` show: "SD 1.x", "SDXL inpainting", "SDXL refiner"..."""
        base = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.name]
        if self.refiner:
            return f"{base} refiner"
        return f"{base} inpainting" if self.inpainting else base


# --- single files -----------------------------------------------------------


def parse_safetensors_header(data: bytes, *, what: str = "checkpoint") -> dict[str, Any]:
    """The JSON header of a safetensors file from its first bytes.

    `data` must hold at least the 8-byte length and the header itself
    (`safetensors_header_length` says how much). Raises ModelLoadError for
    anything that is not a safetensors header.
    """
    length = safetensors_header_length(data, what=what)
    if len(data) < 8 + length:
        raise ModelLoadError(f"{what}: safetensors header is truncated")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{what}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{what}: safetensors header is not a JSON object")
    return header


def safetensors_header_length(data: bytes, *, what: str = "checkpoint") -> int:
    if len(data) < 8:
        raise ModelLoadError(f"{what}: too short to be a safetensors file ({len(data)} bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise ModelLoadError(f"{what}: not a safetensors file (header length {length})")
    return int(length)


def check_safetensors_size(header: Mapping[str, Any], data_size: int, *, what: str) -> None:
    """A truncated or padded file fails here, before any tensor is read.

    `data_size` is the file size less the 8-byte length and the header; the
    safetensors format requires the tensors to cover it exactly.
    """
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"{what}: bad safetensors entry {key!r}") from exc
    if end != data_size:
        state = "truncated" if end > data_size else "longer than its tensors"
        raise ModelLoadError(
            f"{what}: file is {state} (tensors need {end} bytes of data, it has {data_size})"
        )


def tensor_shapes(header: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {
        key: tuple(int(d) for d in info.get("shape", ()))
        for key, info in header.items()
        if key != "__metadata__" and isinstance(info, dict)
    }


def read_file_header(path: Path) -> dict[str, Any]:
    """Header of a local safetensors file, size-checked."""
    what = path.name
    try:
        with path.open("rb") as f:
            head = f.read(8)
            length = safetensors_header_length(head, what=what)
            data = head + f.read(length)
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"{what}: cannot read ({exc.strerror or exc})") from exc
    header = parse_safetensors_header(data, what=what)
    check_safetensors_size(header, size - 8 - length, what=what)
    return header


def detect_from_keys(shapes: Mapping[str, Sequence[int]], *, what: str = "checkpoint") -> Family:
    """Family of a single-file checkpoint in the original LDM key layout."""
    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise ModelLoadError(
            f"{what}: not a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)"
        )
    unet_in = shapes.get(_UNET_IN, ())
    inpainting = len(unet_in) == 4 and unet_in[1] == 9
    second = any(k.startswith("conditioner.embedders.1.") for k in shapes)
    if not second and any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        return Family("sdxl", inpainting, refiner=True)  # OpenCLIP as the only embedder
    if second or any(k.startswith("model.diffusion_model.label_emb.") for k in shapes):
        return Family("sdxl", inpainting)
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return Family("sd2", inpainting)
    v2_k = shapes.get(_V2_ATTN2_K, ())
    if v2_k and v2_k[-1] == 1024:
        return Family("sd2", inpainting)
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return Family("sd1", inpainting)
    raise ModelLoadError(f"{what}: no text encoder found; not an SD 1.x, 2.x or XL checkpoint")


def detect_file(path: Path) -> Family:
    return detect_from_keys(tensor_shapes(read_file_header(path)), what=path.name)


# --- diffusers folders ------------------------------------------------------


def detect_from_configs(
    model_index: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any] | None = None,
    *,
    what: str = "model",
) -> Family:
    """Family of a diffusers folder from `model_index.json` and component configs."""
    cls = str(model_index.get("_class_name", ""))
    if not cls.startswith("StableDiffusion"):
        raise ModelLoadError(
            f"{what}: unsupported pipeline {cls or '(none)'!r} in model_index.json"
        )
    inpainting = int(unet_config.get("in_channels", 4)) == 9
    if model_index.get("requires_aesthetics_score") is True or (
        _component(model_index, "text_encoder_2") and not _component(model_index, "text_encoder")
    ):
        return Family("sdxl", inpainting, refiner=True)
    if (
        "XL" in cls
        or "text_encoder_2" in model_index
        or unet_config.get("addition_embed_type") == "text_time"
    ):
        return Family("sdxl", inpainting)
    if text_encoder_config and text_encoder_config.get("hidden_act") == "gelu":
        return Family("sd2", inpainting)
    if unet_config.get("cross_attention_dim") == 1024:
        return Family("sd2", inpainting)
    return Family("sd1", inpainting)


def _component(model_index: Mapping[str, Any], name: str) -> bool:
    """Whether `model_index.json` names a module for `name` (`[null, null]`: none)."""
    value = model_index.get(name)
    return isinstance(value, list) and bool(value) and value[0] is not None


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{what}: {path.name} is missing") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: cannot read {path.name} ({exc})") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{what}: {path.name} is not a JSON object")
    return value


def detect_folder(path: Path) -> Family:
    what = path.name
    index = _read_json(path / "model_index.json", what=what)
    unet = _read_json(path / "unet" / "config.json", what=what)
    te_path = path / "text_encoder" / "config.json"
    text_encoder = _read_json(te_path, what=what) if te_path.exists() else None
    return detect_from_configs(index, unet, text_encoder, what=what)


def detect(path: Path) -> Family:
    """Family of a local checkpoint: a diffusers folder or a `.safetensors` file."""
    return detect_folder(path) if path.is_dir() else detect_file(path)


# --- pipelines --------------------------------------------------------------


#: diffusers (and transformers under it) resolve classes through lazy modules that
#: are not thread-safe on first access: a render and a prefetch resolving their
#: first pipeline classes at once in a fresh pod saw `AttributeError: module
#: 'diffusers' has no attribute ...`. Every lazy lookup goes through this lock.
_LAZY_IMPORT_LOCK = threading.Lock()


def diffusers_attr(name: str) -> Any:
    """`getattr(diffusers, name)`, safe from several threads."""
    with _LAZY_IMPORT_LOCK:
        import diffusers

        return getattr(diffusers, name)


def preload_pipeline_classes() -> None:
    """Resolve every pipeline class once (imports diffusers and the transformers
    classes under it), so no two threads do a first lazy import at the same time."""
    for kinds in PIPELINES.values():
        for name in kinds.values():
            diffusers_attr(name)


#: The SDXL refiner's class for every kind: it alone builds aesthetic-score time ids.
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"


def pipeline_class(family: Family | FamilyName, kind: PipelineKind = "txt2img") -> type:
    name = family.name if isinstance(family, Family) else family
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"pipeline kind must be one of {', '.join(PIPELINE_KINDS)}, got {kind!r}")
    if isinstance(family, Family) and family.refiner:
        return diffusers_attr(REFINER_PIPELINE)
    return diffusers_attr(PIPELINES[name][kind])


def derive(pipe: Any, family: Family | FamilyName, kind: PipelineKind, **overrides: Any) -> Any:
    """A new pipeline object of `kind` sharing `pipe`'s weights, with its own scheduler.

    Modules are shared, never copied. The scheduler is copied because
    schedulers keep per-run state (`set_timesteps`, step index) and renders
    run in several threads at once; `overrides` replace other components
    (the store passes per-lease tokenizers).

    Not `from_pipe`: in diffusers 0.42 it ends with `new.to(dtype=dtype or
    float32)`, which casts the *shared* fp16 modules to fp32 in place unless
    every caller remembers to pass `dtype`, and logs a warning per call.
    Building the class from the components is what `from_pipe` does minus
    that cast.
    """
    cls = pipeline_class(family, kind)
    return build_like(cls, pipe, **overrides)


def build_like(cls: type, pipe: Any, **overrides: Any) -> Any:
    """`cls` over `pipe`'s components and config flags (see `derive`)."""
    expected, optional = cls._get_signature_keys(cls)  # type: ignore[attr-defined]
    components = {k: v for k, v in pipe.components.items() if k in expected}
    components.update({k: v for k, v in overrides.items() if k in expected})
    if "scheduler" not in overrides:
        components["scheduler"] = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    for name in expected:
        components.setdefault(name, None)  # optional modules the source pipeline lacks
    flags = {k: pipe.config[k] for k in optional if k in pipe.config and k not in components}
    new = cls(**components, **flags)
    new.set_progress_bar_config(disable=True)
    return new
