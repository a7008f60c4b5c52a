"""Where models come from: an S3 bucket (with optional prefix) or a local folder.

Both expose the same small protocol (`list`, `read_range`, `download`,
`local_path`) over keys relative to the models root, in the bucket layout of
docs/models.md (`Stable-diffusion/`, `Lora/`, `VAE/`). botocore errors are
translated here, once: a missing key is `ModelNotFoundError`, anything else
that stops a read is `ModelLoadError`.

S3 downloads are parallel ranged GETs written with `os.pwrite` into one
preallocated file; every range carries `IfMatch=<etag>` so an object replaced
mid-download fails instead of mixing two versions. The file's sha256 is
computed while it downloads, over the prefix that has arrived, so checking it
costs no second read. `part_bytes=0` makes one GET per object: for backends
that read the whole object to serve each range (moto, the local stack).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sdeks.aws import parse_s3_url
from sdeks.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

#: Bytes per ranged GET; large enough to amortise a request, small enough to parallelise.
DEFAULT_PART_BYTES = 16 * 2**20
DEFAULT_CONCURRENCY = 8
#: Tries per range when the body breaks mid-stream (each resumes where the last stopped).
RANGE_ATTEMPTS = 4
_CHUNK = 1 * 2**20


@dataclass(frozen=True)
class ObjectInfo:
    """One object (file) under the models root."""

    key: str
    size: int
    #: Version tag: the S3 ETag, or size+mtime for a local file.
    etag: str | None = None
    #: Full-object sha256 (hex) when the source knows it without reading the data.
    sha256: str | None = None


class ModelSource(Protocol):
    #: Where the models live, for messages: `s3://bucket/prefix` or a path.
    url: str

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def head(self, key: str) -> ObjectInfo: ...

    def read_range(self, key: str, start: int, length: int) -> bytes: ...

    def download(
        self, obj: ObjectInfo, dest: Path, progress: Callable[[int], None] | None = None
    ) -> str | None:
        """Write the object to `dest`; the sha256 (hex) of what was written, if computed."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The object's own path when the source is on this disk (no copy needed)."""
        ...


class LocalSource:
    """A folder on this machine in the bucket layout: used in place, never copied."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = str(self.root)
        if not self.root.is_dir():
            raise ModelLoadError(f"models folder {self.root} does not exist")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys come from requests (A1111 names): never leave the models folder.
        if path != self.root and self.root not in path.parents:
            raise ModelNotFoundError(f"{key!r} is outside the models folder")
        return path

    def _info(self, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(
            key=path.relative_to(self.root).as_posix(),
            size=st.st_size,
            etag=f"{st.st_size}-{st.st_mtime_ns}",
        )

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted((self._info(p) for p in base.rglob("*") if p.is_file()), key=lambda o: o.key)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ModelNotFoundError(f"{key} not found in {self.url}")
        return self._info(path)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"{key} not found in {self.url}") from exc
        except OSError as exc:
            raise ModelLoadError(f"cannot read {key}: {exc}") from exc

    def download(
        self, obj: ObjectInfo, dest: Path, progress: Callable[[int], None] | None = None
    ) -> str | None:
        try:
            shutil.copyfile(self._path(obj.key), dest)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"{obj.key} not found in {self.url}") from exc
        except OSError as exc:
            raise ModelLoadError(f"cannot copy {obj.key}: {exc}") from exc
        if progress:
            progress(obj.size)
        return None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Source:
    """`s3://bucket[/prefix]` through an injected boto3 S3 client (thread-safe).

    `part_bytes` per ranged GET (0: one GET per object), `concurrency` GETs at once.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        part_bytes: int = DEFAULT_PART_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_bytes = part_bytes
        self.concurrency = concurrency
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _error(self, exc: Exception, key: str) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                return ModelNotFoundError(f"{key} not found in {self.url}")
            if code in ("PreconditionFailed", "412"):
                return ModelLoadError(f"{key} changed in {self.url} while it was downloading")
            return ModelLoadError(f"cannot read {key} from {self.url}: {code} {exc}")
        return ModelLoadError(f"cannot read {key} from {self.url}: {exc}")

    def list(self, prefix: str) -> list[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        out: list[ObjectInfo] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    out.append(
                        ObjectInfo(
                            key=item["Key"][len(self.prefix) :],
                            size=int(item["Size"]),
                            etag=item.get("ETag"),
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, prefix) from exc
        return out

    def head(self, key: str) -> ObjectInfo:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.head_object(
                Bucket=self.bucket, Key=self.prefix + key, ChecksumMode="ENABLED"
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key) from exc
        return ObjectInfo(
            key=key,
            size=int(resp["ContentLength"]),
            etag=resp.get("ETag"),
            sha256=_full_object_sha256(resp),
        )

    def read_range(self, key: str, start: int, length: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        if length <= 0:
            return b""
        try:
            resp = self.client.get_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Range=f"bytes={start}-{start + length - 1}",
            )
            return resp["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key) from exc

    def download(
        self, obj: ObjectInfo, dest: Path, progress: Callable[[int], None] | None = None
    ) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        # Preallocate so each part writes at its own offset, in any order.
        with dest.open("wb") as f:
            f.truncate(obj.size)
        if obj.size == 0:
            return hashlib.sha256().hexdigest()
        part = self.part_bytes or obj.size
        ranges = [(start, min(start + part, obj.size) - 1) for start in range(0, obj.size, part)]
        fd = os.open(dest, os.O_RDWR)
        stop = threading.Event()  # one range failed for good: the others stop early
        hasher = _PrefixHasher(fd, [start for start, _ in ranges], obj.size, stop)

        def fetch(index: int) -> None:
            start, end = ranges[index]
            offset = start
            for attempt in range(1, RANGE_ATTEMPTS + 1):
                kwargs: dict[str, Any] = {
                    "Bucket": self.bucket,
                    "Key": self.prefix + obj.key,
                    "Range": f"bytes={offset}-{end}",
                }
                if obj.etag:
                    kwargs["IfMatch"] = obj.etag
                try:
                    body = self.client.get_object(**kwargs)["Body"]
                    try:
                        while chunk := body.read(_CHUNK):
                            if stop.is_set():
                                return
                            if offset + len(chunk) > end + 1:
                                raise ModelLoadError(f"{obj.key}: range {start}-{end} overran")
                            os.pwrite(fd, chunk, offset)
                            offset += len(chunk)
                            hasher.advance(index, offset)
                            if progress:
                                progress(len(chunk))
                    finally:
                        body.close()
                    if offset == end + 1:
                        return
                    problem = f"range ended {end + 1 - offset} bytes early"
                except BotoCoreError as exc:
                    # botocore retries requests, not a body that breaks mid-stream
                    # (ResponseStreamingError): resume the range where it broke.
                    problem = str(exc)
                log.warning(
                    "%s: %s (attempt %d of %d, resuming at byte %d)",
                    obj.key,
                    problem,
                    attempt,
                    RANGE_ATTEMPTS,
                    offset,
                )
            raise ModelLoadError(f"{obj.key}: download failed after {RANGE_ATTEMPTS} attempts")

        hashing = threading.Thread(target=hasher.run, name="s3-sha256", daemon=True)
        hashing.start()
        try:
            with ThreadPoolExecutor(
                max_workers=min(self.concurrency, len(ranges)), thread_name_prefix="s3-range"
            ) as pool:
                futures = [pool.submit(fetch, i) for i in range(len(ranges))]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    stop.set()
                    for future in futures:
                        future.cancel()
                    raise
            return hasher.result()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, obj.key) from exc
        finally:
            stop.set()
            hasher.wake()
            hashing.join()
            os.close(fd)

    def local_path(self, key: str) -> Path | None:
        return None


class _PrefixHasher:
    """sha256 of a file whose ranges are written concurrently, each in order.

    The ranges' writers report how far each has got (`advance`); `run` (its own
    thread) hashes the contiguous prefix as it grows, reading it back from the
    page cache, so the digest is ready when the last byte lands.
    """

    def __init__(self, fd: int, starts: list[int], size: int, stop: threading.Event) -> None:
        self._fd = fd
        self._starts = starts
        self._reached = list(starts)  # per range: the end of what has been written
        self._size = size
        self._stop = stop
        self._hashed = 0
        self._sha = hashlib.sha256()
        self._cond = threading.Condition()
        self._done = threading.Event()

    def advance(self, index: int, offset: int) -> None:
        with self._cond:
            self._reached[index] = offset
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _prefix(self) -> int:
        """How many bytes from the start have been written without a gap."""
        prefix = 0
        for i, start in enumerate(self._starts):
            if start != prefix:
                break
            prefix = self._reached[i]
        return prefix

    def run(self) -> None:
        try:
            while self._hashed < self._size:
                with self._cond:
                    while (prefix := self._prefix()) <= self._hashed and not self._stop.is_set():
                        self._cond.wait()
                if prefix <= self._hashed:
                    return  # stopped before the file was complete
                while self._hashed < prefix:
                    n = min(prefix - self._hashed, 8 * 2**20)
                    data = os.pread(self._fd, n, self._hashed)
                    if not data:
                        return
                    self._sha.update(data)
                    self._hashed += len(data)
        finally:
            self._done.set()

    def result(self) -> str:
        """The digest once every byte is hashed (waits for the hashing thread)."""
        self._done.wait()
        if self._hashed != self._size:
            raise ModelLoadError(f"hashed {self._hashed} of {self._size} bytes")
        return self._sha.hexdigest()


def _full_object_sha256(resp: dict[str, Any]) -> str | None:
    """The object's sha256 when S3 stored a full-object one (not a checksum of parts)."""
    value = resp.get("ChecksumSHA256")
    if not value or "-" in value or resp.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    try:
        return base64.b64decode(value).hex()
    except ValueError:
        return None


def open_source(
    spec: str,
    *,
    s3_client: Any | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> ModelSource:
    """`s3://bucket[/prefix]` (needs `s3_client`) or a local folder."""
    if spec.startswith("s3://"):
        if s3_client is None:
            raise ValueError("an s3:// models source needs an S3 client")
        bucket, prefix = parse_s3_url(spec)
        return S3Source(s3_client, bucket, prefix, part_bytes=part_bytes, concurrency=concurrency)
    return LocalSource(Path(spec))
