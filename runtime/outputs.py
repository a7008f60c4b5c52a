"""Where a job's results go: PNGs and the manifest to the output bucket.

Keys are deterministic (`sdeks.callback.image_key` / `manifest_key`), so a
retried task overwrites its own outputs instead of adding new ones. The S3
client is injected (built once by the app from `sdeks.aws`); botocore errors
become `OutputError`, which the HTTP layer answers with 502 *without* a
callback, so the dispatcher retries the task. The callback itself goes out
through `sdeks.lifecycle.Reporter` (see `runtime.app`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sdeks.callback import Manifest, image_key, manifest_key
from sdeks.envelope import Task
from sdeks.errors import SdeksError

log = logging.getLogger(__name__)


class OutputError(SdeksError):
    """Writing outputs or publishing the callback failed; nothing was reported."""

    code = "output_failed"


class OutputWriter:
    def __init__(self, *, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket

    def output_location(self, task: Task) -> str:
        return task.output_location(self.bucket)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def write_images(self, task: Task, pngs: list[bytes]) -> list[str]:
        """Upload `{prefix}/{id}/{id}-{n}.png`, n from 1, in parallel; returns the keys."""
        keys = [image_key(task.prefix, task.id, n) for n in range(1, len(pngs) + 1)]
        if not pngs:
            return keys

        def put(item: tuple[str, bytes]) -> None:
            key, body = item
            self._put(task, key, body, "image/png")

        with ThreadPoolExecutor(max_workers=min(8, len(pngs))) as pool:
            list(pool.map(put, zip(keys, pngs, strict=True)))
        return keys

    def write_manifest(self, task: Task, manifest: Manifest) -> str:
        key = manifest_key(task.prefix, task.id)
        self._put(task, key, manifest.to_json_bytes(), "application/json")
        return key

    def _put(self, task: Task, key: str, body: bytes, content_type: str) -> None:
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise OutputError(
                f"writing s3://{self.bucket}/{key} failed: {exc}"[:500], task_id=task.id
            ) from exc
