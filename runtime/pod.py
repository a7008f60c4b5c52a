"""`Pod`: the state every route shares (settings, models, renderer, slots, running jobs,
A1111 options), and `PodDep`, how a route receives it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request

from runtime.control import JobControl
from runtime.metrics import PodMetrics
from runtime.models import Models
from runtime.outputs import OutputWriter
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.settings import RuntimeSettings
from sdeks.demand import DemandBoard
from sdeks.grace import FirstCall
from sdeks.lifecycle import Reporter


class Pod:
    """Everything the handlers share: settings, renderer, slots, running jobs, A1111 options."""

    def __init__(
        self,
        settings: RuntimeSettings,
        models: Models,
        renderer: Renderer,
        writer: OutputWriter | None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.renderer = renderer
        self.writer = writer
        #: Publishes callbacks (claim-then-publish with a task table); built at start-up.
        self.reporter: Reporter | None = None
        self.metrics = PodMetrics(settings.runtime, settings.slots)
        self.options: dict[str, Any] = {
            **DEFAULT_OPTIONS,
            "sd_model_checkpoint": settings.default_model,
        }
        self.running: dict[str, JobControl] = {}
        self.a1111_ids: set[str] = set()
        #: Dispatcher replicas' waiting work, relayed between them (`POST /v1/state`).
        self.demand = DemandBoard()
        #: First call for the replica whose job ended last (`sdeks.grace`).
        self.first_call = FirstCall(settings.first_call_s)
        self._slots: asyncio.Semaphore | None = None
        self.started = time.time()

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # created in the running loop
            self._slots = asyncio.Semaphore(self.settings.slots)
        return self._slots

    @property
    def busy(self) -> int:
        return len(self.running)

    def state(self) -> dict[str, Any]:
        try:
            models = self.models.state()
        except Exception as exc:  # a listing failure must not hide the pod's own state
            models = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        return {
            "runtime": self.settings.runtime,
            "device": self.renderer.device,
            "models": models,
            "default_model": self.settings.default_model,
            "busy": self.busy > 0,
            "slots": self.settings.slots,
            "free_slots": max(0, self.settings.slots - self.busy),
            "reserved": held.to_json() if (held := self.first_call.current()) else None,
            "running": [
                {
                    "id": job_id,
                    "progress": round(c.progress, 4),
                    "step": c.step,
                    "steps": c.steps,
                    "job_no": c.job_no,
                    "job_count": c.job_count,
                    "elapsed_s": round(time.time() - c.started, 3),
                }
                for job_id, c in self.running.items()
            ],
        }

    @asynccontextmanager
    async def slot(self, control: JobControl, *, wait: bool) -> AsyncIterator[bool]:
        """Hold a slot for `control`'s job. Yields False (holding nothing) when `wait` is
        False and every slot is taken."""
        if not wait and self.slots.locked():
            yield False
            return
        async with self.slots:
            self.running[control.job_id] = control
            self.metrics.busy.set(self.busy)
            try:
                yield True
            finally:
                self.running.pop(control.job_id, None)
                self.metrics.busy.set(self.busy)

    async def run(self, control: JobControl, fn: Callable[[], Any]) -> Any:
        """Run `fn` in a worker thread once a slot is free (A1111 requests queue)."""
        async with self.slot(control, wait=True):
            return await asyncio.to_thread(fn)


def pod_of(request: Request) -> Pod:
    pod: Pod = request.app.state.pod
    return pod


#: A route parameter `pod: PodDep` receives the app's `Pod`.
PodDep = Annotated[Pod, Depends(pod_of)]
