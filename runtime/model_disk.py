"""The local disk tier: models copied from S3, least recently used evicted by bytes.

Each cached model (a single file, a diffusers folder, a config folder, a LoRA
or VAE) is one directory under the cache root, named after its source key:

    <root>/<slug>-<sha1(key)[:12]>/<file or folder contents>
    <root>/<slug>-<sha1(key)[:12]>/.sdeks-cache.json   (what it is, hashes)

A download goes to `<root>/.tmp-*` first, every file is checked against the
size the source announced and, where S3 stored a full-object sha256, against
that; only then is the directory renamed into place (atomic on one file
system), so a crash never leaves a half model that looks whole. The metadata
file's mtime is the LRU clock, so the order survives a pod restart.
Entries being read (pinned) are never evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdeks.errors import ModelLoadError

from .model_catalog import ModelEntry, folder_sha256
from .model_source import ModelSource

log = logging.getLogger(__name__)

META = ".sdeks-cache.json"
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CachedModel:
    key: str
    dir: Path
    #: The file (single-file entries) or the folder to hand to diffusers.
    path: Path
    bytes: int
    sha256: str
    #: relpath -> {"size", "etag", "sha256"}
    files: dict[str, dict[str, Any]]

    def matches(self, entry: ModelEntry) -> bool:
        """Same source version: every file present with the listed size and etag."""
        if len(entry.files) != len(self.files):
            return False
        for obj in entry.files:
            have = self.files.get(entry.relpath(obj))
            if have is None or have["size"] != obj.size:
                return False
            if obj.etag and have.get("etag") and obj.etag != have["etag"]:
                return False
        return True


class DiskCache:
    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._inflight: dict[str, Future[CachedModel]] = {}
        self._reserved = 0
        self._scan()

    # --- bookkeeping ------------------------------------------------------

    def _scan(self) -> None:
        """Adopt what a previous run left, oldest use first; drop partial downloads."""
        found: list[tuple[float, CachedModel]] = []
        for child in self.root.iterdir():
            if child.name.startswith(".tmp-"):
                shutil.rmtree(child, ignore_errors=True)
                continue
            meta = child / META
            try:
                data = json.loads(meta.read_text())
                cached = CachedModel(
                    key=data["key"],
                    dir=child,
                    path=child / data["path"],
                    bytes=int(data["bytes"]),
                    sha256=data["sha256"],
                    files=data["files"],
                )
                found.append((meta.stat().st_mtime, cached))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("removing unreadable cache entry %s", child)
                shutil.rmtree(child, ignore_errors=True)
        for _, cached in sorted(found, key=lambda t: t[0]):
            self._entries[cached.key] = cached
        if found:
            log.info(
                "disk cache %s: adopted %d models, %d bytes", self.root, len(found), self.used_bytes
            )

    @property
    def used_bytes(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    def keys(self) -> list[str]:
        """Cached keys, most recently used last."""
        with self._lock:
            return list(self._entries)

    def get(self, entry: ModelEntry, *, touch: bool = True) -> CachedModel | None:
        """The cached copy of this version of `entry`; `touch` counts it as a use (LRU)."""
        with self._lock:
            cached = self._entries.get(entry.key)
            if cached is None or not cached.matches(entry):
                return None
            if touch:
                self._touch(cached)
            return cached

    def _touch(self, cached: CachedModel) -> None:
        self._entries.move_to_end(cached.key)
        try:
            os.utime(cached.dir / META)
        except OSError:
            pass

    @contextmanager
    def pinned(self, key: str) -> Iterator[None]:
        """Keep `key` from eviction while its files are being read."""
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    def _make_room(self, need: int, for_key: str) -> None:
        """Evict least recently used, unpinned entries until `need` bytes fit. Lock held."""
        if need > self.capacity_bytes:
            raise ModelLoadError(
                f"{for_key} needs {need} bytes, more than the whole disk cache "
                f"({self.capacity_bytes} bytes)"
            )
        for key in list(self._entries):
            if self.used_bytes + self._reserved + need <= self.capacity_bytes:
                return
            if key in self._pins or key == for_key:
                continue
            victim = self._entries.pop(key)
            log.info("disk cache: evicting %s (%d bytes)", key, victim.bytes)
            shutil.rmtree(victim.dir, ignore_errors=True)
        if self.used_bytes + self._reserved + need > self.capacity_bytes:
            raise ModelLoadError(
                f"disk cache full: {for_key} needs {need} bytes and the models in use "
                f"hold {self.used_bytes + self._reserved} of {self.capacity_bytes}"
            )
        self._make_free_space(need, for_key)

    def _make_free_space(self, need: int, for_key: str) -> None:
        """The byte budget may be larger than the volume (or the volume shared):
        evict more until the file system has room. Downloads in flight are
        sparse files, so their reservations count as used. Lock held."""
        while shutil.disk_usage(self.root).free < need + self._reserved:
            victim = next((k for k in self._entries if k not in self._pins and k != for_key), None)
            if victim is None:
                free = shutil.disk_usage(self.root).free
                raise ModelLoadError(
                    f"not enough free disk space for {for_key}: needs {need} bytes, "
                    f"{free} free on {self.root}"
                )
            cached = self._entries.pop(victim)
            log.info("disk cache: evicting %s (%d bytes) for free space", victim, cached.bytes)
            shutil.rmtree(cached.dir, ignore_errors=True)

    # --- fetching ---------------------------------------------------------

    def fetch(self, source: ModelSource, entry: ModelEntry) -> CachedModel:
        """The entry on local disk: cached, or downloaded once however many ask."""
        with self._lock:
            cached = self._entries.get(entry.key)
            if cached is not None and cached.matches(entry):
                self._touch(cached)
                return cached
            future = self._inflight.get(entry.key)
            owner = future is None
            if owner:
                future = Future()
                self._inflight[entry.key] = future
                if cached is not None:  # stale: the source has a new version
                    self._entries.pop(entry.key)
                    shutil.rmtree(cached.dir, ignore_errors=True)
                try:
                    self._make_room(entry.size, entry.key)
                except BaseException as exc:
                    del self._inflight[entry.key]
                    future.set_exception(exc)
                    raise
                self._reserved += entry.size
        assert future is not None
        if not owner:
            return future.result()
        try:
            cached = self._download(source, entry)
        except BaseException as exc:
            with self._lock:
                self._reserved -= entry.size
                del self._inflight[entry.key]
            future.set_exception(exc)
            raise
        with self._lock:
            self._reserved -= entry.size
            self._entries[entry.key] = cached
            self._touch(cached)
            del self._inflight[entry.key]
        future.set_result(cached)
        return cached

    def _download(self, source: ModelSource, entry: ModelEntry) -> CachedModel:
        started = time.perf_counter()
        slug = _SLUG.sub("_", entry.key.rstrip("/").rsplit("/", 1)[-1])[:80]
        final = self.root / f"{slug}-{hashlib.sha1(entry.key.encode()).hexdigest()[:12]}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            files: dict[str, dict[str, Any]] = {}
            for obj in entry.files:
                rel = entry.relpath(obj)
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                # HEAD gives the current etag (pins the version for the ranged
                # GETs) and S3's own sha256 when the uploader asked for one.
                head = source.head(obj.key)
                if head.size != obj.size:
                    raise ModelLoadError(
                        f"{obj.key} changed size while listing ({obj.size} -> {head.size})"
                    )
                streamed = source.download(head, dest)  # sha256 hashed on the way, if any
                size = dest.stat().st_size
                if size != head.size:
                    raise ModelLoadError(
                        f"{obj.key}: downloaded {size} bytes, expected {head.size}"
                    )
                digest = streamed or file_sha256(dest)
                if head.sha256 and head.sha256 != digest:
                    raise ModelLoadError(f"{obj.key}: sha256 mismatch after download")
                files[rel] = {"size": size, "etag": obj.etag, "sha256": digest}
            if entry.kind == "file":
                (rel,) = files
                sha = files[rel]["sha256"]
                path_rel = rel
            else:
                sha = folder_sha256((rel, f["sha256"]) for rel, f in files.items())
                path_rel = "."
            meta = {
                "key": entry.key,
                "path": path_rel,
                "bytes": sum(f["size"] for f in files.values()),
                "sha256": sha,
                "files": files,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "downloaded %s from %s: %d bytes in %.0f ms",
            entry.key,
            source.url,
            meta["bytes"],
            (time.perf_counter() - started) * 1000,
        )
        return CachedModel(
            key=entry.key,
            dir=final,
            path=final / path_rel,
            bytes=int(meta["bytes"]),
            sha256=sha,
            files=files,
        )
