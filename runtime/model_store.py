"""The model store: S3 -> local disk -> host RAM -> GPU, each tier LRU by bytes.

    source (S3Source | LocalSource)     what exists; ranged, verified downloads
      └─ disk (DiskCache)               copies of S3 objects; a local source is used in place
          └─ ram (CPU pipelines)        loaded with diffusers, `dtype` weights
              └─ device (pipelines)     on CUDA: clones of the RAM weights on the GPU,
                                        as many as `gpu_bytes` allows; on CPU the RAM
                                        pipelines are the device pipelines

Renders run in worker threads: `acquire()`/`use()` pins the model (no tier
evicts a pinned model) and hands out a fresh pipeline object of the asked
kind (`from_pipe`: shared weights, own scheduler and tokenizers), so two
renders never share per-call state. Loads of one model are single-flight:
whoever asks second waits for the first load instead of starting another.

Errors: an unknown name is `ModelNotFoundError` before anything is
downloaded; anything that stops a model from loading (corrupt file, missing
config, bad folder) is `ModelLoadError`; running out of GPU memory while
moving weights is `OutOfMemoryError`.

Other model kinds (upscalers, face restorers, detectors, ControlNets,
embeddings...) live in the same tiers, under the same budgets and LRU order,
loaded once and shared by every request. A kind is a `ModelKind`: which
bucket folders hold it, which file suffixes count, how to load a file into
host RAM and how to copy that onto the device (sizes are measured on the
loaded object). The whole API:

    UPSCALER = ModelKind("upscaler", folders=("ESRGAN/", "RealESRGAN/"),
                         load=load_spandrel, suffixes=(".safetensors", ".pth"))
    store.entries(UPSCALER)                   # what the source holds (ModelEntry list)
    with store.use_weights(UPSCALER, "RealESRGAN_x4plus") as lease:
        lease.model                           # the device object, pinned until the block ends

A name resolves like a checkpoint name (file name with or without suffix,
`name [hash]`, hash); callers that map other names (A1111's "R-ESRGAN 4x+")
pass the `ModelEntry` itself. `.pth` files must be loaded with torch's
weights-only unpickler (`torch.load(..., weights_only=True)`), never plain
pickle: a kind's loader is responsible for that.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdeks.errors import ModelLoadError, ModelNotFoundError, OutOfMemoryError
from sdeks.names import MODELS_CHECKPOINT_PREFIX

from .families import (
    Family,
    PipelineKind,
    build_like,
    check_safetensors_size,
    derive,
    detect,
    detect_from_keys,
    parse_safetensors_header,
    pipeline_class,
    safetensors_header_length,
    tensor_shapes,
)
from .model_catalog import (
    MODELS_CONFIG_PREFIX,
    Catalog,
    ModelEntry,
    find_entry,
    folder_sha256,
)
from .model_disk import DiskCache, file_sha256
from .model_source import ModelSource

#: Serializes diffusers model construction (see `ModelStore._load_to_ram`); a kind's
#: `load` runs under it, so loaders never take it themselves. Reentrant only as a
#: safety net: a loader that did would deadlock on a plain Lock.
_FROM_PRETRAINED_LOCK = threading.RLock()
log = logging.getLogger(__name__)

Tier = Literal["gpu", "ram", "disk", "source"]
GiB = 2**30


@dataclass(frozen=True)
class StoreLimits:
    """Byte budgets per tier (settings map `SDEKS_*` variables onto these)."""

    disk_bytes: int = 200 * GiB
    ram_bytes: int = 48 * GiB
    #: GPU bytes for resident weights; None: total GPU memory less `gpu_reserve_bytes`.
    gpu_bytes: int | None = None
    #: Left free on the GPU for activations, VAE decode and LoRAs.
    gpu_reserve_bytes: int = 8 * GiB
    #: Wait at least this long between re-listings caused by unknown names.
    relist_after_s: float = 10.0


@dataclass
class LoadTimings:
    """How one `acquire` got its model: where it was found and what each step cost."""

    #: The tier the model was found in ("source": not on this machine yet).
    found_in: Tier
    download_ms: float = 0.0
    #: disk -> RAM (diffusers load; includes the family check and config fetch).
    ram_ms: float = 0.0
    #: RAM -> device (GPU copy; 0 on CPU).
    device_ms: float = 0.0
    #: Waiting for a load another request started.
    wait_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def model_load_ms(self) -> int:
        """The callback's `timings.model_load_ms`."""
        return round(self.total_ms)


def object_bytes(obj: Any) -> int:
    """Bytes of the tensors a loaded object holds: a torch module, an object with a
    `.model` module (spandrel's descriptors), or a mapping of tensors."""
    import torch

    module = getattr(obj, "model", obj)
    if isinstance(module, torch.nn.Module):
        tensors = [*module.parameters(), *module.buffers()]
    elif isinstance(obj, dict):
        tensors = [t for t in obj.values() if isinstance(t, torch.Tensor)]
    else:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_to_device(obj: Any, device: str, dtype: Any) -> Any:
    """A device copy of a loaded module (or object with `.to`), leaving the RAM one as it is.

    Kinds with small weights (upscalers, restorers, detectors) take this default:
    a deep copy, then `.to(device)`; `dtype` is the store's run dtype, which a kind
    that cannot run in half precision ignores by passing its own `to_device`.
    """
    clone = copy.deepcopy(obj)
    return clone.to(device)


@dataclass(frozen=True)
class ModelKind:
    """A kind of weights other than checkpoints, as the store lists and loads it."""

    #: Short name in logs, errors and `state()["kinds"]` ("upscaler", "face restorer").
    name: str
    #: Bucket folders holding this kind, in lookup order (A1111's folder names).
    folders: tuple[str, ...]
    #: (local path, entry) -> the object in host RAM, on the CPU, ready for use (eval mode).
    load: Callable[[Path, ModelEntry], Any]
    #: File suffixes listed (diffusers folders with a `config.json` are listed too).
    suffixes: tuple[str, ...] = (".safetensors",)
    #: (RAM object, device, store dtype) -> the object on the device.
    to_device: Callable[[Any, str, Any], Any] = copy_to_device
    #: The RAM object's size for the tier budgets.
    size: Callable[[Any], int] = object_bytes
    #: The name a model of this kind is listed and asked for by, besides its file
    #: names (A1111's "R-ESRGAN 4x+" for `RealESRGAN_x4plus.pth`).
    display_name: Callable[[ModelEntry], str] = lambda entry: entry.name
    #: entry -> None, run before `load` and outside the construction lock: fetches what
    #: `load` reads besides the entry's own files (a ControlNet's config folder), so
    #: no download happens while every other model load waits on that lock.
    prepare: Callable[[ModelEntry], None] | None = None


@dataclass
class _Lease:
    """A pin on a model, released once (by `release` or the `use*` context)."""

    _release: Any = field(repr=False, default=None, kw_only=True)

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release(self)


@dataclass
class WeightsLease(_Lease):
    """A pinned model of another kind (see `ModelKind`), for one use."""

    entry: ModelEntry
    kind: ModelKind
    #: The device object (on CPU without device copies: the RAM object itself).
    model: Any
    timings: LoadTimings
    device: str


@dataclass
class _Loaded:
    """A model in RAM (and maybe on the device)."""

    entry: ModelEntry
    #: None for models of another kind (`kind` is set instead).
    family: Family | None
    pipe: Any
    bytes: int
    #: The GPU copy on CUDA; on CPU the RAM pipeline itself.
    device_pipe: Any | None = None
    pins: int = 0
    #: Spare tokenizer sets: fast tokenizers keep padding state and must not be shared by threads.
    tokenizers: list[dict[str, Any]] = field(default_factory=list)
    #: None for a checkpoint.
    kind: ModelKind | None = None


@dataclass
class ModelLease(_Lease):
    """A pinned model and a pipeline of the asked kind, for one render."""

    name: str
    title: str
    #: A1111 short hash (10 hex), None until known.
    hash: str | None
    sha256: str | None
    family: Family
    kind: PipelineKind
    pipeline: Any
    timings: LoadTimings
    device: str


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """diffusers renamed `torch_dtype` to `dtype` (the old name now warns); pass the one it knows."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _own_weights(module: Any) -> None:
    """Copy a module's weights out of the files diffusers mapped, once.

    diffusers maps safetensors files and its tensors point into the mapping.
    The RAM tier must hold the bytes themselves: otherwise the first render
    pays the reads, the RAM budget counts bytes that are not in memory, and an
    evicted cache file's space stays in use while mapped. One copy from the
    mapping is the cheapest way there (reading the file into a buffer first,
    diffusers' `disable_mmap`, copies every byte twice). Tensors that share
    storage stay shared.
    """
    copies: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], Any], Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        key = (
            tensor.data_ptr(),
            tensor.untyped_storage().data_ptr(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if key not in copies:
            copies[key] = tensor.data.clone()
        tensor.data = copies[key]


def module_bytes(pipe: Any) -> int:
    import torch

    total = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in comp.parameters())
            total += sum(t.numel() * t.element_size() for t in comp.buffers())
    return total


def clone_pipeline(pipe: Any, device: str, dtype: Any = None) -> Any:
    """A copy of `pipe` on `device` without a second host copy of the weights.

    Each module is rebuilt from its config with empty (meta) weights, then
    takes the tensors moved straight to the device (`assign=True`). On the
    same device and dtype the clone shares storage with `pipe`.
    """
    import torch
    from accelerate import init_empty_weights

    replaced: dict[str, Any] = {}
    for name, comp in pipe.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        with init_empty_weights():
            if hasattr(comp, "from_config") and hasattr(comp, "register_to_config"):
                clone = type(comp).from_config(comp.config)  # type: ignore[attr-defined]  # diffusers ModelMixin
            else:
                clone = type(comp)(comp.config)  # transformers PreTrainedModel
        state = {
            k: v.to(device=device, dtype=dtype or v.dtype) for k, v in comp.state_dict().items()
        }
        clone.load_state_dict(state, strict=True, assign=True)
        clone.to(device)  # non-persistent buffers (position ids) built on the host
        clone.eval().requires_grad_(False)
        replaced[name] = clone
    return build_like(type(pipe), pipe, scheduler=pipe.scheduler, **replaced)


class ModelStore:
    def __init__(
        self,
        source: ModelSource,
        *,
        cache_dir: Path,
        limits: StoreLimits | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        shipped_configs: Path | None = None,
        channels_last: bool = False,
        prefetch_workers: int = 1,
        device_copies: bool | None = None,
    ) -> None:
        """`device_copies`: keep a separate device copy of each model, within the
        GPU budget (default: on CUDA only). On CPU it makes the GPU tier's
        bookkeeping testable without a GPU; the copies share the RAM tensors."""
        import torch

        self.source = source
        self.limits = limits or StoreLimits()
        self.device = device
        self.on_cuda = device.startswith("cuda")
        if self.on_cuda and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available")
        # fp32 on CPU: half precision is slow there and some ops lack kernels.
        self.dtype_name = (dtype or "float16") if self.on_cuda else "float32"
        self.dtype = getattr(torch, self.dtype_name)
        self.shipped_configs = shipped_configs
        self.channels_last = channels_last
        self.disk = DiskCache(cache_dir, self.limits.disk_bytes)
        self.device_copies = self.on_cuda if device_copies is None else device_copies
        self.gpu_bytes = self._gpu_budget() if self.device_copies else 0

        self._lock = threading.RLock()
        self._ram: OrderedDict[str, _Loaded] = OrderedDict()
        self._gpu: OrderedDict[str, _Loaded] = OrderedDict()
        self._ram_inflight: dict[str, Future[_Loaded]] = {}
        self._gpu_inflight: dict[str, Future[None]] = {}
        self._hashes: dict[tuple[str, tuple[str | None, ...]], str] = {}
        self._catalog: Catalog | None = None
        self._listed_at = 0.0
        self._executor = ThreadPoolExecutor(prefetch_workers, thread_name_prefix="model-prefetch")

    def _gpu_budget(self) -> int:
        import torch

        if self.limits.gpu_bytes is not None:
            return self.limits.gpu_bytes
        if not self.on_cuda:
            raise ValueError("device copies off CUDA need an explicit gpu_bytes budget")
        _, total = torch.cuda.mem_get_info(torch.device(self.device))
        return max(0, total - self.limits.gpu_reserve_bytes)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- catalog ----------------------------------------------------------

    def refresh(self) -> Catalog:
        """List the source again (A1111 `/refresh-checkpoints`)."""
        catalog = Catalog(self.source.list(""), source=self.source.url)
        with self._lock:
            for entry in catalog.checkpoints + catalog.loras + catalog.vaes:
                entry.sha256 = self._known_hash(entry)
            self._catalog = catalog
            self._listed_at = time.monotonic()
        log.info(
            "models in %s: %d checkpoints, %d LoRAs, %d VAEs",
            self.source.url,
            len(catalog.checkpoints),
            len(catalog.loras),
            len(catalog.vaes),
        )
        return catalog

    @property
    def catalog(self) -> Catalog:
        return self._catalog or self.refresh()

    def _known_hash(self, entry: ModelEntry) -> str | None:
        memo = self._hashes.get(_version(entry))
        if memo:
            return memo
        if self.source.local_path(entry.key) is not None:
            return None
        cached = self.disk.get(entry, touch=False)  # a listing is not a use
        return cached.sha256 if cached else None

    def _remember_hash(self, entry: ModelEntry, sha256: str) -> None:
        with self._lock:
            self._hashes[_version(entry)] = sha256
            entry.sha256 = sha256
            if self._catalog is not None:
                for e in self._catalog.checkpoints + self._catalog.loras + self._catalog.vaes:
                    if e.key == entry.key:
                        e.sha256 = sha256

    def resolve(self, requested: str, kind: str = "checkpoint") -> ModelEntry:
        """The entry an A1111 name means; `ModelNotFoundError` without downloading anything."""
        if not isinstance(requested, str) or not requested.strip():
            raise ModelNotFoundError(
                f"{kind} name must be a non-empty string, got {requested!r:.80}"
            )
        entry = self.catalog.find(requested, kind)
        if entry is None and time.monotonic() - self._listed_at >= self.limits.relist_after_s:
            entry = self.refresh().find(requested, kind)  # uploaded since the last listing?
        if entry is None:
            return self.catalog.resolve(requested, kind)  # raises with the list of names
        return entry

    def ensure_hash(self, requested: str, kind: str = "checkpoint") -> str | None:
        """The entry's sha256: computed now for a local source, known for a
        downloaded S3 object, else None (computing it would mean downloading)."""
        entry = self.resolve(requested, kind)
        if entry.sha256 is None:
            path = self.source.local_path(entry.key)
            if path is not None:
                self._hash_local(entry, path)
        return entry.sha256

    def sd_models(self) -> list[dict[str, Any]]:
        """`GET /sdapi/v1/sd-models` items (A1111 field names)."""
        return [
            {
                "title": e.title,
                "model_name": e.model_name,
                "hash": e.hash,
                "sha256": e.sha256,
                "filename": f"{self.source.url}/{e.key}".rstrip("/"),
                "config": None,
            }
            for e in self.catalog.checkpoints
        ]

    def loras(self) -> list[ModelEntry]:
        return list(self.catalog.loras)

    def vaes(self) -> list[ModelEntry]:
        return list(self.catalog.vaes)

    # --- disk tier --------------------------------------------------------

    def _local(self, entry: ModelEntry) -> tuple[Path, float]:
        """The entry on this disk, and the download time (0 when it was there)."""
        path = self.source.local_path(entry.key)
        if path is not None:
            if not path.exists():
                raise ModelNotFoundError(f"{entry.key} is gone from {self.source.url}")
            return path, 0.0
        started = time.perf_counter()
        cached = self.disk.get(entry)
        if cached is None:
            cached = self.disk.fetch(self.source, entry)
            self._remember_hash(entry, cached.sha256)
            return cached.path, (time.perf_counter() - started) * 1000
        return cached.path, 0.0

    def _fetch_aux(self, requested: str, kind: str) -> Path:
        entry = self.resolve(requested, kind)
        path, _ = self._local(entry)
        return path

    def fetch_lora(self, name: str) -> Path:
        """A LoRA file from `Lora/` on local disk (`<lora:name:w>`: name with or without extension)."""
        return self._fetch_aux(name, "lora")

    def fetch_vae(self, name: str) -> Path:
        """A VAE (`sd_vae`) from `VAE/` on local disk: a `.safetensors` file or a diffusers folder."""
        return self._fetch_aux(name, "vae")

    def file_keys(self, prefix: str, *, relist: bool = False) -> list[str]:
        """Keys of the source's objects under `prefix` (e.g. `wildcards/`), sorted, as last
        listed; `relist`: list the source again first unless it was just listed."""
        if relist and time.monotonic() - self._listed_at >= self.limits.relist_after_s:
            self.refresh()
        return sorted(k for k in self.catalog.objects if k.startswith(prefix))

    def fetch_file(self, key: str) -> Path:
        """One object of the source on local disk (annotator weights), cached like a model."""
        obj = self.catalog.objects.get(key)
        if obj is None and time.monotonic() - self._listed_at >= self.limits.relist_after_s:
            obj = self.refresh().objects.get(key)
        if obj is None:
            raise ModelNotFoundError(f"{key} not found in {self.source.url}")
        path, _ = self._local(ModelEntry(name=key, kind="file", key=key, files=(obj,)))
        return path

    def _check_remote_header(self, entry: ModelEntry) -> Family:
        """Family of a single file from its header: fails a corrupt file before a download."""
        what = entry.name
        head = self.source.read_range(entry.key, 0, 8)
        length = safetensors_header_length(head, what=what)
        header = parse_safetensors_header(
            head + self.source.read_range(entry.key, 8, length), what=what
        )
        check_safetensors_size(header, entry.size - 8 - length, what=what)
        return detect_from_keys(tensor_shapes(header), what=what)

    def _config_dir(self, entry: ModelEntry, family: Family) -> Path:
        """Diffusers configs for a single file: its own `.config/`, the bucket's, or the image's."""
        catalog = self.catalog
        for key in (entry.config_key, f"{MODELS_CONFIG_PREFIX}{family.config_name}/"):
            if not key:
                continue
            files = catalog.config_folder(key)
            if any(f.key == key + "model_index.json" for f in files):
                folder = ModelEntry(name=key, kind="folder", key=key, files=files)
                path, _ = self._local(folder)
                return path
        if (
            self.shipped_configs
            and (self.shipped_configs / family.config_name / "model_index.json").is_file()
        ):
            return self.shipped_configs / family.config_name
        stem = entry.key[: -len(".safetensors")]
        raise ModelLoadError(
            f"{entry.name} is a single-file {family.label} checkpoint with no config: upload a "
            f"diffusers config folder (no weights needed) to {stem}.config/ or "
            f"{MODELS_CONFIG_PREFIX}{family.config_name}/"
        )

    # --- RAM tier ---------------------------------------------------------

    def _ensure_ram(
        self, entry: ModelEntry, timings: LoadTimings, *, pin: bool, kind: ModelKind | None = None
    ) -> _Loaded:
        """The model in RAM, loaded at most once at a time; pinned in the same
        locked step that makes it visible when `pin`, so a trim cannot evict it
        between loading and use."""
        with self._lock:
            loaded = self._ram.get(entry.key)
            if loaded is not None and _version(loaded.entry) == _version(entry):
                self._ram.move_to_end(entry.key)
                loaded.pins += pin
                return loaded
            future = self._ram_inflight.get(entry.key)
            owner = future is None
            if owner:
                future = Future()
                self._ram_inflight[entry.key] = future
        assert future is not None
        if not owner:
            started = time.perf_counter()
            try:
                loaded = future.result()
            finally:
                timings.wait_ms += (time.perf_counter() - started) * 1000
            with self._lock:
                self._ram.setdefault(entry.key, loaded)  # trimmed meanwhile: it is in use again
                loaded.pins += pin
            return loaded
        try:
            if kind is None:
                loaded = self._load_to_ram(entry, timings)
            else:
                loaded = self._load_kind_to_ram(kind, entry, timings)
        except BaseException as exc:
            with self._lock:
                del self._ram_inflight[entry.key]
            future.set_exception(exc)
            raise
        with self._lock:
            if self._ram.pop(entry.key, None) is not None:
                self._gpu.pop(entry.key, None)  # an older version of this model
            self._ram[entry.key] = loaded
            loaded.pins += pin
            del self._ram_inflight[entry.key]
            self._trim_ram()
        future.set_result(loaded)
        return loaded

    def _load_to_ram(self, entry: ModelEntry, timings: LoadTimings) -> _Loaded:
        import torch

        if entry.kind == "file" and self.source.local_path(entry.key) is None:
            self._check_remote_header(entry)
        path, download_ms = self._local(entry)
        timings.download_ms += download_ms
        started = time.perf_counter()
        family = detect(path)
        cls: Any = pipeline_class(family, "txt2img")
        kwargs: dict[str, Any] = {**dtype_kwargs(self.dtype), "local_files_only": True}
        if family.name == "sdxl":
            kwargs["add_watermarker"] = False
        else:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            # One load at a time per process: diffusers builds models under
            # accelerate's `init_empty_weights`, which patches torch process-wide and
            # restores it on exit; two overlapping loads restore each other's patch,
            # leaving every module built afterwards on the `meta` device.
            with _FROM_PRETRAINED_LOCK:
                if entry.kind == "folder":
                    pipe = cls.from_pretrained(str(path), **kwargs)
                else:
                    config = self._config_dir(entry, family)
                    pipe = cls.from_single_file(str(path), config=str(config), **kwargs)
        except (ModelLoadError, ModelNotFoundError):
            raise
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            raise OutOfMemoryError(f"out of host memory loading {entry.name}") from exc
        except (
            Exception
        ) as exc:  # diffusers raises OSError, ValueError, KeyError, SafetensorError...
            raise ModelLoadError(f"cannot load {entry.name}: {type(exc).__name__}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                comp.eval().requires_grad_(False)
                _own_weights(comp)
        nbytes = module_bytes(pipe)
        timings.ram_ms += (time.perf_counter() - started) * 1000
        log.info(
            "loaded %s (%s) into RAM: %d bytes in %.0f ms",
            entry.name,
            family.label,
            nbytes,
            timings.ram_ms,
        )
        if entry.sha256 is None and self.source.local_path(entry.key) is not None:
            self._executor.submit(self._hash_local, entry, path)
        return _Loaded(entry=entry, family=family, pipe=pipe, bytes=nbytes)

    def _load_kind_to_ram(
        self, kind: ModelKind, entry: ModelEntry, timings: LoadTimings
    ) -> _Loaded:
        path, download_ms = self._local(entry)
        timings.download_ms += download_ms
        started = time.perf_counter()
        try:
            if kind.prepare is not None:
                kind.prepare(entry)
            # Under the diffusers lock: a checkpoint loading meanwhile patches torch's
            # module construction process-wide (`init_empty_weights`), which would
            # build this model's parameters on the `meta` device.
            with _FROM_PRETRAINED_LOCK:
                obj = kind.load(path, entry)
        except (ModelLoadError, ModelNotFoundError):
            raise
        except MemoryError as exc:
            raise OutOfMemoryError(f"out of host memory loading {kind.name} {entry.name}") from exc
        except Exception as exc:  # torch, spandrel, safetensors raise many types
            raise ModelLoadError(
                f"cannot load {kind.name} {entry.name}: {type(exc).__name__}: {exc}"[:500]
            ) from exc
        nbytes = kind.size(obj)
        timings.ram_ms += (time.perf_counter() - started) * 1000
        log.info(
            "loaded %s %s into RAM: %d bytes in %.0f ms",
            kind.name,
            entry.name,
            nbytes,
            timings.ram_ms,
        )
        return _Loaded(entry=entry, family=None, pipe=obj, bytes=nbytes, kind=kind)

    def _hash_local(self, entry: ModelEntry, path: Path) -> None:
        """A1111 hash of a model in a local folder, computed off the render path."""
        try:
            if entry.kind == "folder":
                sha = folder_sha256(
                    (entry.relpath(o), file_sha256(path / entry.relpath(o))) for o in entry.files
                )
            else:
                sha = file_sha256(path)
        except OSError as exc:
            log.warning("cannot hash %s: %s", path, exc)
            return
        self._remember_hash(entry, sha)

    def _trim_ram(self) -> None:
        """Evict least recently used, unpinned RAM models over budget. Lock held."""
        for key in list(self._ram):
            if sum(m.bytes for m in self._ram.values()) <= self.limits.ram_bytes:
                return
            loaded = self._ram[key]
            if loaded.pins:
                continue
            log.info("RAM tier: evicting %s (%d bytes)", loaded.entry.name, loaded.bytes)
            del self._ram[key]
            self._gpu.pop(key, None)

    # --- device tier ------------------------------------------------------

    def _ensure_device(self, loaded: _Loaded, timings: LoadTimings) -> Any:
        if not self.device_copies:
            loaded.device_pipe = loaded.pipe
            return loaded.pipe
        key = loaded.entry.key
        with self._lock:
            if key in self._gpu and loaded.device_pipe is not None:
                self._gpu.move_to_end(key)
                return loaded.device_pipe
            future = self._gpu_inflight.get(key)
            owner = future is None
            if owner:
                future = Future()
                self._gpu_inflight[key] = future
                self._trim_gpu(need=loaded.bytes)
        assert future is not None
        if not owner:
            future.result()
            return loaded.device_pipe
        started = time.perf_counter()
        try:
            loaded.device_pipe = self._to_device(loaded)
        except BaseException as exc:
            with self._lock:
                del self._gpu_inflight[key]
            future.set_exception(exc)
            raise
        with self._lock:
            self._gpu[key] = loaded
            del self._gpu_inflight[key]
        future.set_result(None)
        timings.device_ms += (time.perf_counter() - started) * 1000
        return loaded.device_pipe

    def _to_device(self, loaded: _Loaded) -> Any:
        import torch

        try:
            if loaded.kind is not None:
                pipe = loaded.kind.to_device(loaded.pipe, self.device, self.dtype)
            else:
                pipe = clone_pipeline(loaded.pipe, self.device, self.dtype)
            if self.channels_last and loaded.kind is None:
                pipe.unet.to(memory_format=torch.channels_last)
            if self.on_cuda:
                torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError as exc:
            if self.on_cuda:
                torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"out of GPU memory moving {loaded.entry.name} ({loaded.bytes} bytes) to {self.device}"
            ) from exc
        return pipe

    def _trim_gpu(self, need: int) -> None:
        """Evict least recently used, unpinned GPU models until `need` fits. Lock held."""
        import torch

        freed = False
        for key in list(self._gpu):
            if sum(m.bytes for m in self._gpu.values()) + need <= self.gpu_bytes:
                break
            loaded = self._gpu[key]
            if loaded.pins:
                continue
            log.info("GPU tier: evicting %s (%d bytes)", loaded.entry.name, loaded.bytes)
            del self._gpu[key]
            loaded.device_pipe = None
            freed = True
        if freed and self.on_cuda:
            torch.cuda.empty_cache()

    # --- public: leases, prefetch, state ------------------------------------

    def acquire(self, requested: str, kind: PipelineKind = "txt2img") -> ModelLease:
        """The model on the device, pinned, as a fresh pipeline of `kind`. Call `release()`."""
        started = time.perf_counter()
        entry = self.resolve(requested)
        timings = LoadTimings(found_in=self._tier_of(entry))
        loaded = self._ensure_ram(entry, timings, pin=True)
        assert loaded.family is not None  # a checkpoint
        family = loaded.family
        try:
            device_pipe = self._ensure_device(loaded, timings)
            tokenizers = self._take_tokenizers(loaded, device_pipe)
            pipe = derive(device_pipe, family, kind, **tokenizers)
        except BaseException:
            self._unpin(loaded)
            raise
        timings.total_ms = (time.perf_counter() - started) * 1000
        entry = loaded.entry

        def release(lease: ModelLease) -> None:
            with self._lock:
                loaded.tokenizers.append(tokenizers)
            self._unpin(loaded)

        return ModelLease(
            name=entry.name,
            title=entry.title,
            hash=entry.hash,
            sha256=entry.sha256,
            family=family,
            kind=kind,
            pipeline=pipe,
            timings=timings,
            device=self.device,
            _release=release,
        )

    # --- public: other model kinds ------------------------------------------

    def entries(self, kind: ModelKind) -> list[ModelEntry]:
        """The models of `kind` in the source (from the current listing)."""
        return list(self.catalog.entries_in(kind.folders, kind.suffixes))

    def resolve_weights(self, kind: ModelKind, requested: str) -> ModelEntry:
        """The entry of `kind` a name means (checkpoint naming rules); `ModelNotFoundError`
        listing what exists, after one re-listing when the name is unknown."""
        if not isinstance(requested, str) or not requested.strip():
            raise ModelNotFoundError(
                f"{kind.name} name must be a non-empty string, got {requested!r:.80}"
            )
        entry = _find(kind, self.entries(kind), requested)
        if entry is None and time.monotonic() - self._listed_at >= self.limits.relist_after_s:
            self.refresh()
            entry = _find(kind, self.entries(kind), requested)
        if entry is None:
            names = list(dict.fromkeys(kind.display_name(e) for e in self.entries(kind)))
            known = ", ".join(names[:20]) or "none"
            more = f" and {len(names) - 20} more" if len(names) > 20 else ""
            raise ModelNotFoundError(
                f"{kind.name} {requested!r} not found in {self.source.url} under "
                f"{', '.join(kind.folders)} (available: {known}{more})"
            )
        return entry

    def acquire_weights(self, kind: ModelKind, requested: str | ModelEntry) -> WeightsLease:
        """A model of `kind` on the device, pinned until `release()`; loaded once, then
        shared by every lease (the object must not be modified by its users)."""
        started = time.perf_counter()
        entry = (
            requested
            if isinstance(requested, ModelEntry)
            else self.resolve_weights(kind, requested)
        )
        timings = LoadTimings(found_in=self._tier_of(entry))
        loaded = self._ensure_ram(entry, timings, pin=True, kind=kind)
        try:
            model = self._ensure_device(loaded, timings)
        except BaseException:
            self._unpin(loaded)
            raise
        timings.total_ms = (time.perf_counter() - started) * 1000

        def release(_lease: WeightsLease) -> None:
            self._unpin(loaded)

        return WeightsLease(
            entry=loaded.entry,
            kind=kind,
            model=model,
            timings=timings,
            device=self.device,
            _release=release,
        )

    @contextmanager
    def use_weights(self, kind: ModelKind, requested: str | ModelEntry) -> Iterator[WeightsLease]:
        lease = self.acquire_weights(kind, requested)
        try:
            yield lease
        finally:
            lease.release()

    @contextmanager
    def use(self, requested: str, kind: PipelineKind = "txt2img") -> Iterator[ModelLease]:
        lease = self.acquire(requested, kind)
        try:
            yield lease
        finally:
            lease.release()

    def _take_tokenizers(self, loaded: _Loaded, pipe: Any) -> dict[str, Any]:
        with self._lock:
            if loaded.tokenizers:
                return loaded.tokenizers.pop()
        return {
            name: copy.deepcopy(comp)
            for name, comp in pipe.components.items()
            if name.startswith("tokenizer") and comp is not None
        }

    def _unpin(self, loaded: _Loaded) -> None:
        with self._lock:
            loaded.pins -= 1
            if not loaded.pins:
                self._trim_ram()

    def load(self, requested: str) -> LoadTimings:
        """Bring a model onto the device now (warm-up), without rendering."""
        with self.use(requested) as lease:
            return lease.timings

    def prefetch(self, requested: str) -> Future[LoadTimings]:
        """Bring a model to disk and RAM in the background (not onto the GPU).

        The name is resolved first, so an unknown model raises here, at once.
        """
        entry = self.resolve(requested)

        def run() -> LoadTimings:
            started = time.perf_counter()
            timings = LoadTimings(found_in=self._tier_of(entry))
            self._ensure_ram(entry, timings, pin=False)
            timings.total_ms = (time.perf_counter() - started) * 1000
            return timings

        future = self._executor.submit(run)

        def report(done: Future[LoadTimings]) -> None:
            exc = done.exception()
            if exc is not None:
                log.warning("prefetch of %s failed: %s", entry.name, exc)

        future.add_done_callback(report)
        return future

    def _tier_of(self, entry: ModelEntry) -> Tier:
        with self._lock:
            loaded = self._ram.get(entry.key)
            if loaded is not None:
                if not self.device_copies or entry.key in self._gpu:
                    return "gpu"
                return "ram"
        if (
            self.source.local_path(entry.key) is not None
            or self.disk.get(entry, touch=False) is not None
        ):
            return "disk"
        return "source"

    def state(self) -> dict[str, Any]:
        """Models per tier for `GET /v1/state` (A1111 names, most recently used last)."""
        with self._lock:
            ram = [m.entry.name for m in self._ram.values() if m.kind is None]
            gpu = (
                [m.entry.name for m in self._gpu.values() if m.kind is None]
                if self.device_copies
                else list(ram)
            )
            kinds: dict[str, dict[str, list[str]]] = {}
            for m in self._ram.values():
                if m.kind is not None:
                    tiers = kinds.setdefault(m.kind.name, {"gpu": [], "ram": []})
                    tiers["ram"].append(m.entry.name)
                    if not self.device_copies or m.entry.key in self._gpu:
                        tiers["gpu"].append(m.entry.name)
            loading = sorted({k for k in self._ram_inflight} | {k for k in self._gpu_inflight})
            ram_bytes = sum(m.bytes for m in self._ram.values())
            gpu_bytes = (
                sum(m.bytes for m in self._gpu.values()) if self.device_copies else ram_bytes
            )
            pinned = [m.entry.name for m in self._ram.values() if m.pins and m.kind is None]
        catalog = self._catalog
        by_key = {e.key: e.name for e in catalog.checkpoints} if catalog else {}
        if self.source.local_path("") is not None:
            disk = sorted(by_key.values())
        else:
            disk = [by_key[k] for k in self.disk.keys() if k in by_key]
        return {
            "device": self.device,
            "dtype": self.dtype_name,
            "gpu": gpu,
            "ram": ram,
            "disk": disk,
            "loading": [k.removeprefix(MODELS_CHECKPOINT_PREFIX).rstrip("/") for k in loading],
            "in_use": pinned,
            #: Other model kinds (upscalers, restorers...) per tier; their bytes are in `bytes`.
            "kinds": kinds,
            "bytes": {"gpu": gpu_bytes, "ram": ram_bytes, "disk": self.disk.used_bytes},
            "budget_bytes": {
                "gpu": self.gpu_bytes if self.device_copies else self.limits.ram_bytes,
                "ram": self.limits.ram_bytes,
                "disk": self.limits.disk_bytes,
            },
        }


def _find(kind: ModelKind, entries: list[ModelEntry], requested: str) -> ModelEntry | None:
    """The kind's display name, then checkpoint naming rules (`find_entry`); the first
    entry wins when two folders hold the same name."""
    wanted = requested.strip()
    for entry in entries:
        if wanted == kind.display_name(entry):
            return entry
    return find_entry(entries, requested)


def _version(entry: ModelEntry) -> tuple[str, tuple[str | None, ...]]:
    return entry.key, tuple(f"{o.key}:{o.size}:{o.etag}" for o in entry.files)
