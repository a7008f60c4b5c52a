"""Talking to runtime pods over HTTP, and what the dispatcher knows of each pod.

The pod contract (sdeks/job.py): `POST /v1/jobs` answers 200 with the callback
it published (succeeded or failed), 429 when full; anything else means
nothing was published. `GET /v1/state` tells which models sit on which tier;
its exact shape belongs to the runtime, so `PodState.parse` accepts the
plausible variants and ignores what it does not know. `POST /v1/prefetch` is
a hint; a pod without it (404) is remembered as not supporting it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from dispatcher.errors import PodBusyError, PodDuplicateError, PodFailedError, PodRejectedError
from sdeks.callback import Callback, TaskStatus
from sdeks.demand import DemandReport, parse_counts
from sdeks.grace import RESERVED, Reserved
from sdeks.job import Job

log = logging.getLogger(__name__)


def _names(value: Any) -> frozenset[str]:
    """A tier as a list of names, or of {"name": ...} objects, or a {name: ...} map."""
    if isinstance(value, Mapping):
        return frozenset(str(k) for k in value)
    if isinstance(value, list | tuple):
        out = set()
        for item in value:
            if isinstance(item, str):
                out.add(item)
            elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
                out.add(item["name"])
        return frozenset(out)
    return frozenset()


@dataclass(frozen=True)
class PodState:
    """The parts of `GET /v1/state` the scheduler uses."""

    gpu: frozenset[str] = frozenset()
    ram: frozenset[str] = frozenset()
    disk: frozenset[str] = frozenset()
    #: Every model the pod can obtain (its bucket listing), when it says so.
    available: frozenset[str] | None = None
    slots: int = 1
    free_slots: int = 1
    busy: bool = False
    default_model: str | None = None
    draining: bool = False
    #: Other dispatcher replicas' waiting tasks per model as the pod relays them
    #: (`sdeks.demand`); None when the pod does not relay them (an older runtime).
    demand: Mapping[str, int] | None = None
    #: The pod holds first call for a replica whose job just ended (`sdeks.grace`).
    reserved: Reserved | None = None
    #: The pod knows first call (its state has `reserved`): jobs may name their replica.
    first_call: bool = False

    @classmethod
    def parse(cls, doc: Any) -> PodState:
        if not isinstance(doc, Mapping):
            return cls()
        models = doc.get("models")
        tiers: Mapping[str, Any] = models if isinstance(models, Mapping) else doc
        available = None
        for key in ("available", "catalog", "available_models"):
            if key in tiers or key in doc:
                available = _names(tiers.get(key, doc.get(key)))
                break
        busy_raw = doc.get("busy", False)
        busy = bool(busy_raw)
        busy_count = (
            busy_raw if isinstance(busy_raw, int) and not isinstance(busy_raw, bool) else None
        )
        slots = doc.get("slots", doc.get("max_jobs", doc.get("capacity")))
        free = doc.get("free_slots", doc.get("free"))
        if not isinstance(slots, int) or slots < 1:
            slots = max(1, (free if isinstance(free, int) else 0) + (busy_count or int(busy)))
        if not isinstance(free, int):
            free = max(0, slots - (busy_count if busy_count is not None else int(busy)))
        default = doc.get("default_model")
        return cls(
            gpu=_names(tiers.get("gpu")),
            ram=_names(tiers.get("ram")),
            disk=_names(tiers.get("disk")),
            available=available,
            slots=slots,
            free_slots=max(0, free),
            busy=busy,
            default_model=default if isinstance(default, str) else None,
            draining=bool(doc.get("draining", False)),
            demand=parse_counts(doc["demand"], strict=False) if "demand" in doc else None,
            reserved=Reserved.parse(doc.get("reserved")),
            first_call="reserved" in doc,
        )


@dataclass(eq=False)
class Pod:
    """One pod as the dispatcher sees it; mutated only by the routing shell."""

    url: str
    runtime: str
    state: PodState | None = None
    #: Jobs this dispatcher has in flight on the pod.
    inflight: int = 0
    #: Model of the last job sent (the pod switches to it), else its first GPU model.
    active_model: str | None = None
    failures: int = 0
    #: Set when the pod is dropped: in-flight calls to it are abandoned and rescheduled.
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    #: False once discovery no longer lists it: no new work, running jobs finish.
    listed: bool = True
    prefetch_supported: bool = True
    #: False once the pod answered a demand report with 404/405 (it is polled with GET).
    demand_supported: bool = True
    last_prefetch: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    #: After a 429 the pod is left out of planning until then (the router's clock).
    full_until: float = 0.0
    #: First call another replica holds on the pod (`sdeks.grace`): (replica, model
    #: key, until on the router's clock).
    held: tuple[str, str, float] | None = None

    @property
    def name(self) -> str:
        return self.url

    @property
    def schedulable(self) -> bool:
        return (
            self.listed
            and not self.gone.is_set()
            and self.state is not None
            and not self.state.draining
        )

    @property
    def free_slots(self) -> int:
        if self.state is None:
            return 0
        # The pod's own count covers other dispatcher replicas; ours covers
        # what we sent since its last report.
        return max(0, min(self.state.free_slots, self.state.slots - self.inflight))


class PodClient:
    """HTTP calls to pods. Pod URLs come from configuration or the Kubernetes API, never users."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        job_timeout_s: float,
        state_timeout_s: float,
        token: str | None = None,
    ) -> None:
        self._session = session
        # The pods' shared token (SDEKS_POD_TOKEN), sent on every call.
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._job_timeout = aiohttp.ClientTimeout(total=job_timeout_s, connect=10)
        self._state_timeout = aiohttp.ClientTimeout(total=state_timeout_s)

    async def submit(self, pod_url: str, job: Job) -> Callback:
        """Run one job; returns the callback the pod published."""
        url = f"{pod_url.rstrip('/')}/v1/jobs"
        task_id = job.task.id
        try:
            async with self._session.post(
                url,
                data=job.model_dump_json(),
                headers={"Content-Type": "application/json", **self._auth},
                timeout=self._job_timeout,
            ) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PodFailedError(
                f"pod {pod_url} did not answer job {task_id}: {type(exc).__name__}: {exc}"[:400],
                pod=pod_url,
                task_id=task_id,
            ) from exc
        if status == 200:
            try:
                return Callback.model_validate_json(body)
            except ValueError:
                # The pod said it published; its answer's shape is its own business.
                log.warning(
                    "pod %s answered 200 with an unreadable body",
                    pod_url,
                    extra={"task_id": task_id},
                )
                return Callback(id=task_id, status=TaskStatus.SUCCEEDED, result=True)
        if status in (401, 403):
            # A token mismatch is the deployment's fault, not the task's: try elsewhere.
            raise PodFailedError(
                f"pod {pod_url} refused the dispatcher's token (HTTP {status}): "
                "SDEKS_POD_TOKEN differs between them",
                pod=pod_url,
                task_id=task_id,
            )
        if status == 429:
            reserved = _reserved_of(body)
            if reserved is not None:
                raise PodBusyError(
                    f"pod {pod_url} holds first call for replica {reserved.replica}",
                    pod=pod_url,
                    task_id=task_id,
                    reserved=reserved,
                )
            raise PodBusyError(f"pod {pod_url} is full", pod=pod_url, task_id=task_id)
        if status == 409:
            raise PodDuplicateError(
                f"pod {pod_url} already runs task {task_id}, or it already ended",
                pod=pod_url,
                task_id=task_id,
            )
        if 400 <= status < 500 and status not in (404, 408, 409):
            code, message = _error_of(body)
            raise PodRejectedError(
                message or f"pod {pod_url} refused job {task_id} with HTTP {status}",
                pod=pod_url,
                error_code=code or "invalid_parameter",
                task_id=task_id,
            )
        raise PodFailedError(
            f"pod {pod_url} answered job {task_id} with HTTP {status}", pod=pod_url, task_id=task_id
        )

    async def state(self, pod_url: str, report: DemandReport | None = None) -> PodState:
        """The pod's state; with `report`, sent along (`POST /v1/state`), and the
        other replicas' demand read back. A pod without that endpoint (404, 405)
        is asked with `GET` instead: its state then has no `demand`."""
        url = f"{pod_url.rstrip('/')}/v1/state"
        try:
            if report is not None:
                async with self._session.post(
                    url, json=report.to_json(), headers=self._auth, timeout=self._state_timeout
                ) as response:
                    if response.status == 200:
                        return PodState.parse(await response.json(content_type=None))
                    if response.status not in (404, 405):
                        raise PodFailedError(
                            f"pod {pod_url} state: HTTP {response.status}", pod=pod_url
                        )
            async with self._session.get(
                url, headers=self._auth, timeout=self._state_timeout
            ) as response:
                if response.status != 200:
                    raise PodFailedError(
                        f"pod {pod_url} state: HTTP {response.status}", pod=pod_url
                    )
                state = PodState.parse(await response.json(content_type=None))
                # A GET's `demand` counts every replica, this one too: not the others'.
                return replace(state, demand=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise PodFailedError(
                f"pod {pod_url} state: {type(exc).__name__}: {exc}", pod=pod_url
            ) from exc

    async def prefetch(self, pod_url: str, model: str) -> bool:
        """Hint the pod to load `model` into RAM; False when the pod has no prefetch endpoint."""
        url = f"{pod_url.rstrip('/')}/v1/prefetch"
        try:
            async with self._session.post(
                url, json={"model": model}, headers=self._auth, timeout=self._state_timeout
            ) as response:
                if response.status == 405:
                    return False
                if response.status == 404:
                    # The pod's own 404 names the model; a router's 404 has no error code.
                    code, _ = _error_of(await response.read())
                    return code is not None
                return True
        except (aiohttp.ClientError, OSError, TimeoutError):
            return True  # a hint; the next one may land


def _reserved_of(body: bytes) -> Reserved | None:
    """The hold a 429 `reserved` names (`sdeks.grace`), else None (a plain 429: full)."""
    import json

    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, Mapping) or doc.get("code") != RESERVED:
        return None
    return Reserved.parse(doc.get("reserved"))


def _error_of(body: bytes) -> tuple[str | None, str | None]:
    """`{"error": {"code", "message"}}` or FastAPI's `{"detail": ...}`, when present."""
    import json

    try:
        doc = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(doc, Mapping):
        return None, None
    error = doc.get("error")
    if isinstance(error, Mapping):
        code, message = error.get("code"), error.get("message")
        return (
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else None,
        )
    detail = doc.get("detail")
    if detail is not None:
        return None, str(detail)[:500]
    return None, None
