"""The seam between rendering and the model store, and per-job pipeline copies.

`render.py` needs four things from wherever models come from: load a
checkpoint by its A1111 name into a text-to-image pipeline, list checkpoints,
and find LoRA and VAE files. `ModelSource` is that protocol;
`runtime.model_store.ModelStore` is the real implementation (tiers, prefetch)
and `StoreSource` adapts it. `FolderSource` is the minimal stand-in used when
the store cannot be built: diffusers folders from a directory, no tiers.

Each job renders on its own pipeline object made with `from_pipe` (shares the
weights, ~ms), so its scheduler and callbacks never leak into another job.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from sdeks.errors import ModelLoadError, ModelNotFoundError
from sdeks.names import MODELS_CHECKPOINT_PREFIX

log = logging.getLogger(__name__)

PipelineKind = Literal["txt2img", "img2img", "inpaint"]


@dataclass(frozen=True)
class ModelInfo:
    """One checkpoint as `/sdapi/v1/sd-models` lists it."""

    title: str
    model_name: str
    filename: str
    hash: str | None = None
    sha256: str | None = None
    family: str | None = None


@dataclass
class LoadedModel:
    info: ModelInfo
    pipeline: Any  # a diffusers text-to-image pipeline, on the render device
    load_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ModelSource(Protocol):
    def load(self, name: str) -> LoadedModel: ...
    def list(self) -> list[ModelInfo]: ...
    def refresh(self) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def prefetch(self, name: str) -> None: ...
    def lora_file(self, name: str) -> Path: ...
    def vae_file(self, name: str) -> Path: ...


class FolderSource:
    """Diffusers folders under `<root>/Stable-diffusion/`; one model kept loaded."""

    def __init__(self, root: Path, *, device: str, dtype: Any = None) -> None:
        self.root = Path(root)
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None

    def _dir(self) -> Path:
        return self.root / MODELS_CHECKPOINT_PREFIX.rstrip("/")

    def list(self) -> list[ModelInfo]:
        base = self._dir()
        if not base.is_dir():
            return []
        return [
            ModelInfo(title=p.name, model_name=p.name, filename=str(p))
            for p in sorted(base.iterdir())
            if (p / "model_index.json").exists()
        ]

    def refresh(self) -> None:
        return None

    def _find(self, name: str) -> ModelInfo:
        wanted = name.split(" [")[0].strip()
        stem = wanted.removesuffix(".safetensors").removesuffix(".ckpt")
        for info in self.list():
            if info.model_name in (wanted, stem):
                return info
        raise ModelNotFoundError(f"model {name!r} not found in {self._dir()}")

    def load(self, name: str) -> LoadedModel:
        info = self._find(name)
        with self._lock:
            if self._loaded and self._loaded.info == info:
                return LoadedModel(info, self._loaded.pipeline, 0)
            start = time.perf_counter()
            try:
                from diffusers import DiffusionPipeline

                kwargs = {"torch_dtype": self.dtype} if self.dtype is not None else {}
                pipe = DiffusionPipeline.from_pretrained(info.filename, **kwargs).to(self.device)
                pipe.set_progress_bar_config(disable=True)
            except Exception as exc:
                raise ModelLoadError(f"model {name!r} could not be loaded: {exc}"[:500]) from exc
            self._loaded = LoadedModel(info, pipe, int((time.perf_counter() - start) * 1000))
            return self._loaded

    def state(self) -> dict[str, Any]:
        loaded = [self._loaded.info.title] if self._loaded else []
        return {"gpu": loaded, "ram": loaded, "disk": [m.title for m in self.list()]}

    def prefetch(self, name: str) -> None:
        self._find(name)

    def lora_file(self, name: str) -> Path:
        return _find_file(self.root / "Lora", name, "LoRA")

    def vae_file(self, name: str) -> Path:
        return _find_file(self.root / "VAE", name, "VAE")


class S3FolderSource(FolderSource):
    """`FolderSource` over `s3://BUCKET[/PREFIX]`: checkpoints are synced to `cache_dir` on use."""

    def __init__(self, url: str, *, s3: Any, cache_dir: Path, device: str, dtype: Any = None):
        super().__init__(Path(cache_dir), device=device, dtype=dtype)
        from sdeks.aws import parse_s3_url

        self.bucket, prefix = parse_s3_url(url)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.s3 = s3

    def list(self) -> list[ModelInfo]:
        base = f"{self.prefix}{MODELS_CHECKPOINT_PREFIX}"
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/"
        )
        names = [
            cp["Prefix"][len(base) :].rstrip("/")
            for page in pages
            for cp in page.get("CommonPrefixes", [])
        ]
        return [
            ModelInfo(title=n, model_name=n, filename=str(self._dir() / n)) for n in sorted(names)
        ]

    def load(self, name: str) -> LoadedModel:
        info = self._find(name)
        self._sync(f"{MODELS_CHECKPOINT_PREFIX}{info.model_name}/", Path(info.filename))
        return super().load(name)

    def _find(self, name: str) -> ModelInfo:
        try:
            return super()._find(name)
        except ModelNotFoundError:
            raise ModelNotFoundError(
                f"model {name!r} not found in s3://{self.bucket}/{self.prefix}"
                f"{MODELS_CHECKPOINT_PREFIX}"
            ) from None

    def _sync(self, key_prefix: str, dest: Path) -> None:
        if (dest / ".complete").exists():
            return
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + key_prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self.prefix + key_prefix) :]
                if not rel or ".." in rel.split("/"):
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(self.bucket, obj["Key"], str(target))
        (dest / ".complete").touch()

    def lora_file(self, name: str) -> Path:
        return self._fetch_file("Lora", name, "LoRA")

    def vae_file(self, name: str) -> Path:
        return self._fetch_file("VAE", name, "VAE")

    def _fetch_file(self, folder: str, name: str, what: str) -> Path:
        for suffix in ("", ".safetensors", ".pt", ".ckpt", ".bin"):
            key = f"{self.prefix}{folder}/{name}{suffix}"
            target = self.root / folder / f"{name}{suffix}"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(self.bucket, key, str(target))
                return target
            except Exception:  # botocore 404: try the next suffix
                continue
        raise ModelNotFoundError(
            f"{what} {name!r} not found in s3://{self.bucket}/{self.prefix}{folder}/"
        )


def build_source(models: str, *, cache_dir: Path, device: str, dtype: Any = None) -> ModelSource:
    """The model source for `--models`: `s3://...` or a local directory."""
    if models.startswith("s3://"):
        from sdeks import aws

        return S3FolderSource(
            models, s3=aws.client("s3"), cache_dir=cache_dir, device=device, dtype=dtype
        )
    return FolderSource(Path(models), device=device, dtype=dtype)


def _find_file(folder: Path, name: str, what: str) -> Path:
    for suffix in ("", ".safetensors", ".pt", ".ckpt", ".bin"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    raise ModelNotFoundError(f"{what} {name!r} not found in {folder}")


def pipeline_for(base: Any, kind: PipelineKind, scheduler: Any) -> Any:
    """A job's own pipeline of `kind` over `base`'s weights, with its own scheduler."""
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
    )

    auto = {
        "txt2img": AutoPipelineForText2Image,
        "img2img": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting,
    }[kind]
    pipe = auto.from_pipe(base, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
