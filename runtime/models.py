"""The model store as the pod uses it: what rendering and the HTTP API call, and
how the store is built from the pod's settings.

`runtime.model_store.ModelStore` (S3 -> disk -> RAM -> GPU tiers, leases,
prefetch) is the implementation; `Models` names the part of it this side
depends on, so tests can substitute a fake and the coupling stays visible.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from runtime.model_catalog import ModelEntry
    from runtime.model_store import LoadTimings, ModelKind, ModelLease, ModelStore, WeightsLease
    from runtime.settings import RuntimeSettings

PipelineKind = Literal["txt2img", "img2img", "inpaint"]


class Models(Protocol):
    device: str

    def use(
        self, requested: str, kind: PipelineKind = "txt2img"
    ) -> AbstractContextManager[ModelLease]: ...
    def resolve(self, requested: str, kind: str = "checkpoint") -> Any: ...
    def load(self, requested: str) -> LoadTimings: ...
    def prefetch(self, requested: str) -> Future[LoadTimings]: ...
    def fetch_lora(self, name: str) -> Path: ...
    def fetch_vae(self, name: str) -> Path: ...
    def fetch_file(self, key: str) -> Path: ...
    def file_keys(self, prefix: str, *, relist: bool = False) -> list[str]: ...
    # Other model kinds (upscalers, restorers, ControlNets...): see runtime.model_store.ModelKind.
    def entries(self, kind: ModelKind) -> list[ModelEntry]: ...
    def resolve_weights(self, kind: ModelKind, requested: str) -> ModelEntry: ...
    def acquire_weights(self, kind: ModelKind, requested: str | ModelEntry) -> WeightsLease: ...
    def use_weights(
        self, kind: ModelKind, requested: str | ModelEntry
    ) -> AbstractContextManager[WeightsLease]: ...
    def sd_models(self) -> list[dict[str, Any]]: ...
    def refresh(self) -> Any: ...
    def state(self) -> dict[str, Any]: ...
    def loras(self) -> list[Any]: ...
    def vaes(self) -> list[Any]: ...


def build_store(settings: RuntimeSettings, device: str, *, s3_client: Any = None) -> ModelStore:
    """The store for `settings.models` (`s3://BUCKET[/PREFIX]` or a directory)."""
    from runtime.model_source import open_source
    from runtime.model_store import ModelStore, StoreLimits

    if not settings.models:
        raise ValueError("no models source: pass --models s3://BUCKET[/PREFIX]|DIR or SDEKS_MODELS")
    if settings.models.startswith("s3://") and s3_client is None:
        from sdeks import aws

        s3_client = aws.client("s3")
    limits = StoreLimits(
        disk_bytes=settings.disk_cache_bytes,
        ram_bytes=settings.ram_cache_bytes,
        gpu_bytes=settings.gpu_cache_bytes,
        gpu_reserve_bytes=settings.gpu_reserve_bytes,
    )
    return ModelStore(
        open_source(
            settings.models,
            s3_client=s3_client,
            part_bytes=settings.s3_part_mib * 2**20,
            concurrency=settings.s3_concurrency,
        ),
        cache_dir=settings.cache_dir,
        limits=limits,
        device=device,
        dtype=settings.dtype,
        shipped_configs=settings.shipped_configs,
        channels_last=settings.channels_last,
    )
