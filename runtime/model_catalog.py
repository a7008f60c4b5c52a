"""What models exist, and which one an A1111 name means.

Built from one listing of the models source (pure: no network here). Rules,
following AUTOMATIC1111 (`modules/sd_models.py`):

- A single file `Stable-diffusion/sub/foo.safetensors` is named
  `sub/foo.safetensors`; its `model_name` is `sub/foo`.
- A diffusers folder `Stable-diffusion/bar/model_index.json` is named `bar`
  (also its `model_name`). Folders named `*.config` are the configs of single
  files, not models.
- The short hash is the first 10 hex digits of the sha256 of the file (as
  A1111's "new" hash). For a folder it is the sha256 of the lines
  `"<relative path>\\t<sha256 of file>\\n"` over its files sorted by path - a
  content hash, the same wherever the folder lies. Hashes are known once the
  bytes have been read (after the first download or local load), as in A1111.
- `title` is `name [shorthash]` when the hash is known, else `name`.
- A requested name matches, in order: any alias exactly (name, model_name,
  title, short hash, full sha256); then, with a trailing ` [hash]` removed,
  name or model_name. Unlike A1111 there is no substring match: a typo fails
  with `model_not_found` instead of silently rendering another model.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sdeks.errors import ModelNotFoundError
from sdeks.names import MODELS_CHECKPOINT_PREFIX, MODELS_LORA_PREFIX, MODELS_VAE_PREFIX

from .model_source import ObjectInfo

log = logging.getLogger(__name__)

#: Weight files we load. Pickled `.ckpt`/`.pt` can run code when loaded: refused.
WEIGHT_SUFFIXES = (".safetensors",)
#: Suffixes a file name loses in its `model_name` (other model kinds may list `.pth`
#: files, loaded with torch's weights-only unpickler, and `.pt2` torch.export programs;
#: see `runtime.model_store.ModelKind`).
NAME_SUFFIXES = (".safetensors", ".pth", ".pt2", ".pt", ".onnx")
CONFIG_FOLDER_SUFFIX = ".config"
#: Family-wide configs for single files that ship none: `configs/sd1/`, `configs/sdxl/`...
MODELS_CONFIG_PREFIX = "configs/"

_HASH_SUFFIX = re.compile(r"\s*\[([0-9a-fA-F]{8,64})\]\s*$")


def checkpoint_stem(name: str) -> str:
    """A checkpoint name without ` [hash]` and weight suffix, for comparing names.

    `"v1-5.safetensors [6ce0161689]"`, `"v1-5.safetensors"` and `"v1-5"` all give
    `"v1-5"`: what a scheduler can match a task's `sd_model_checkpoint` against
    the names in a pod's `GET /v1/state` with (no torch needed to import this).
    """
    bare = _HASH_SUFFIX.sub("", name).strip()
    for suffix in WEIGHT_SUFFIXES:
        bare = bare.removesuffix(suffix)
    return bare


def short_hash(sha256: str | None) -> str | None:
    return sha256[:10] if sha256 else None


def folder_sha256(file_hashes: Iterable[tuple[str, str]]) -> str:
    """Content hash of a folder from (relative path, file sha256) pairs."""
    h = hashlib.sha256()
    for rel, digest in sorted(file_hashes):
        h.update(f"{rel}\t{digest}\n".encode())
    return h.hexdigest()


@dataclass
class ModelEntry:
    """One checkpoint, LoRA or VAE as found in the source."""

    #: A1111 name: `foo.safetensors` (file) or `bar` (folder), relative to its kind's prefix.
    name: str
    kind: Literal["file", "folder"]
    #: Source key of the file, or of the folder with a trailing `/`.
    key: str
    files: tuple[ObjectInfo, ...]
    #: Key of the single file's own config folder (`foo.config/`), when it has one.
    config_key: str | None = None
    sha256: str | None = field(default=None)

    @property
    def model_name(self) -> str:
        for suffix in NAME_SUFFIXES:
            if self.name.endswith(suffix):
                return self.name[: -len(suffix)]
        return self.name

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def hash(self) -> str | None:
        return short_hash(self.sha256)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def aliases(self) -> set[str]:
        names = {self.name, self.model_name, self.title}
        if self.sha256:
            names |= {self.sha256, self.hash or "", f"{self.model_name} [{self.hash}]"}
        return {n for n in names if n}

    def relpath(self, obj: ObjectInfo) -> str:
        """Where a file goes inside this entry's local copy."""
        if self.kind == "folder":
            return obj.key[len(self.key) :]
        return obj.key.rsplit("/", 1)[-1]


# Files of a diffusers folder that are never read when safetensors weights
# sit beside them: pickles (unsafe to load), other frameworks' weights.
_SKIP_WHEN_SAFETENSORS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb")


def wanted_files(files: list[ObjectInfo]) -> tuple[ObjectInfo, ...]:
    """The files of a diffusers folder that loading reads: no pickles or
    `x.fp16.safetensors` variants beside safetensors weights, so the disk tier
    never downloads what diffusers will not open."""
    dirs_with_st = {o.key.rsplit("/", 1)[0] for o in files if o.key.endswith(".safetensors")}
    keys = {o.key for o in files}
    keep: list[ObjectInfo] = []
    for obj in files:
        folder, _, base = obj.key.rpartition("/")
        if folder in dirs_with_st and base.endswith(_SKIP_WHEN_SAFETENSORS):
            continue
        parts = base.split(".")
        if (
            len(parts) == 3
            and parts[2] == "safetensors"
            and f"{folder}/{parts[0]}.safetensors" in keys
        ):
            continue
        keep.append(obj)
    return tuple(keep)


def build_entries(
    objects: Iterable[ObjectInfo], prefix: str, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES
) -> list[ModelEntry]:
    """Checkpoints (or LoRAs, VAEs, other kinds' files ending in `suffixes`) under
    `prefix` from a flat object listing."""
    objects = [o for o in objects if o.key.startswith(prefix)]
    folder_roots = sorted(
        {
            o.key.rsplit("/", 1)[0] + "/"
            for o in objects
            if o.key.endswith(("/model_index.json", "/config.json"))
        },
        key=len,
    )
    # Only the outermost folder counts (a VAE folder's config.json is its root;
    # a pipeline's unet/config.json is not).
    roots: list[str] = []
    for root in folder_roots:
        if root == prefix or any(root.startswith(r) for r in roots):
            continue
        is_pipeline = any(o.key == root + "model_index.json" for o in objects)
        if prefix == MODELS_CHECKPOINT_PREFIX and not is_pipeline:
            continue
        roots.append(root)
    configs = [r for r in roots if r.rstrip("/").endswith(CONFIG_FOLDER_SUFFIX)]
    models = [r for r in roots if r not in configs]

    entries: list[ModelEntry] = []
    for root in models:
        files = wanted_files([o for o in objects if o.key.startswith(root)])
        entries.append(
            ModelEntry(name=root[len(prefix) : -1], kind="folder", key=root, files=files)
        )
    for obj in objects:
        if not obj.key.endswith(suffixes) or any(obj.key.startswith(r) for r in roots):
            continue
        stem = obj.key.rsplit(".", 1)[0]
        config = stem + CONFIG_FOLDER_SUFFIX + "/"
        entries.append(
            ModelEntry(
                name=obj.key[len(prefix) :],
                kind="file",
                key=obj.key,
                files=(obj,),
                config_key=config if config in configs else None,
            )
        )
    return sorted(entries, key=lambda e: e.name.lower())


def first_checkpoint(models: Any) -> str | None:
    """The checkpoint a pod started without a default uses: the first one listed
    (`GET /sdapi/v1/sd-models` order), as A1111 loads the first checkpoint it finds.
    None when there is none, or the listing fails (tasks then name their model)."""
    try:
        listed = models.sd_models()
    except Exception as exc:  # the pod still starts; a task naming no model says why
        log.warning("could not list checkpoints for a default model: %s", exc)
        return None
    if not listed:
        return None
    name = str(listed[0]["model_name"])
    log.info("no default model set: using the first checkpoint, %s", name)
    return name


def find_entry(entries: list[ModelEntry], requested: str) -> ModelEntry | None:
    """The entry A1111 naming means: any of its aliases (name, file name, stem), else
    the name less a trailing ` [hash]`; the first entry wins."""
    wanted = requested.strip()
    for entry in entries:
        if wanted in entry.aliases():
            return entry
    match = _HASH_SUFFIX.search(wanted)
    if match:
        bare = wanted[: match.start()]
        for entry in entries:
            if bare in (entry.name, entry.model_name):
                return entry
    return None


class Catalog:
    """Checkpoints, LoRAs and VAEs of one listing, with A1111 name resolution."""

    def __init__(self, objects: Iterable[ObjectInfo], *, source: str = "models") -> None:
        objects = list(objects)
        self.source = source
        self.objects = {o.key: o for o in objects}
        self.checkpoints = build_entries(objects, MODELS_CHECKPOINT_PREFIX)
        self.loras = build_entries(objects, MODELS_LORA_PREFIX)
        self.vaes = build_entries(objects, MODELS_VAE_PREFIX)
        self._by_folders: dict[tuple[tuple[str, ...], tuple[str, ...]], list[ModelEntry]] = {}

    def entries_in(
        self, folders: tuple[str, ...], suffixes: tuple[str, ...] = WEIGHT_SUFFIXES
    ) -> list[ModelEntry]:
        """Entries of another model kind: files ending in `suffixes` (or diffusers
        folders) under each of `folders`, in folder order, each named relative to its
        folder. Built once per listing."""
        key = (folders, suffixes)
        if key not in self._by_folders:
            objects = list(self.objects.values())
            self._by_folders[key] = [
                e for folder in folders for e in build_entries(objects, folder, suffixes)
            ]
        return self._by_folders[key]

    def config_folder(self, key: str) -> tuple[ObjectInfo, ...]:
        """The files under a config folder key (`.../foo.config/`, `configs/sd1/`)."""
        return tuple(o for k, o in self.objects.items() if k.startswith(key))

    def find(self, requested: str, kind: str = "checkpoint") -> ModelEntry | None:
        entries = {"checkpoint": self.checkpoints, "lora": self.loras, "vae": self.vaes}[kind]
        return find_entry(entries, requested)

    def resolve(self, requested: str, kind: str = "checkpoint") -> ModelEntry:
        entry = self.find(requested, kind)
        if entry is None:
            entries = {"checkpoint": self.checkpoints, "lora": self.loras, "vae": self.vaes}[kind]
            known = ", ".join(e.name for e in entries[:20]) or "none"
            more = f" and {len(entries) - 20} more" if len(entries) > 20 else ""
            raise ModelNotFoundError(
                f"{kind} {requested!r} not found in {self.source} (available: {known}{more})"
            )
        return entry
