"""The progress bar of `sdeks submit --wait` and `sdeks wait`: status, steps, images
and ETA of one task, read from the task table (`sdeks.lifecycle.describe`).

Callbacks say only `queued` then `succeeded`; the table knows the steps a pod
has rendered, and the ETA comes from measured render times (docs/lifecycle.md).
Drawn with rich on stderr: live on a terminal, a final line elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from sdeks.lifecycle import StatusView, describe
from sdeks.tasks import TaskTable

log = logging.getLogger(__name__)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "eta ?"
    if seconds >= 90:
        return f"eta ~{seconds / 60:.0f}m"
    return f"eta ~{seconds:.0f}s"


class TaskProgress:
    """One bar for one task id; `refresh()` reads the table at most every `interval_s`."""

    def __init__(
        self,
        task_id: str,
        table: TaskTable | None,
        *,
        images: int | None = None,
        interval_s: float = 1.0,
        console: Console | None = None,
    ) -> None:
        self.task_id = task_id
        self.table = table
        self.images = images
        self.interval_s = interval_s
        self.view: StatusView | None = None
        self._last = 0.0
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[steps]}"),
            TextColumn("{task.fields[images]}"),
            TextColumn("{task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._bar: TaskID | None = None

    def __enter__(self) -> TaskProgress:
        self._progress.start()
        self._bar = self._progress.add_task(
            f"{self.task_id} queued", total=None, steps="", images=self._images(), eta=_eta(None)
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def _images(self, done: bool = False) -> str:
        if not self.images:
            return ""
        return f"{self.images if done else 0}/{self.images} images"

    def status(self, status: str) -> None:
        """A status known without the table (a callback arrived)."""
        assert self._bar is not None
        self._progress.update(self._bar, description=f"{self.task_id} {status}")

    def refresh(self, *, force: bool = False) -> StatusView | None:
        """Read the task's record and redraw; returns the view (None: unknown yet)."""
        now = time.monotonic()
        if self.table is None or (not force and now - self._last < self.interval_s):
            return self.view
        self._last = now
        try:
            view = asyncio.run(describe(self.table, self.task_id))
        except Exception as exc:  # a progress bar must never end a wait
            log.debug("progress of %s unavailable: %s", self.task_id, exc)
            return self.view
        if view is not None:
            self.show(view)
        return view

    def show(self, view: StatusView) -> None:
        assert self._bar is not None
        self.view = view
        record = view.record
        done, total = record.progress_done or 0, record.progress_total or record.planned_steps
        if record.status.terminal:
            done = total or 1
            total = total or 1
        label = record.status.value
        if view.queue_position is not None:
            label += f" (#{view.queue_position + 1} in queue)"
        fields: dict[str, Any] = {
            "description": f"{self.task_id} {label}",
            "steps": f"{done}/{total} steps" if total else "",
            "images": self._images(done=record.status.terminal and bool(record.image_url)),
            "eta": "" if record.status.terminal else _eta(view.eta_s),
        }
        if record.image_url:
            fields["images"] = f"{len(record.image_url)} images"
        self._progress.update(self._bar, total=total, completed=done, **fields)
