"""The scheduling shell: waiting tasks and known pods in, pods handed out.

Each held task's coroutine calls `Router.run_job`, which registers the task
as waiting and awaits a pod. One loop (`Router.run`) re-plans whenever
something changes - a task arrives, a job ends, a pod's state changes - or
when the policy asked to be woken (a wait bound about to trip), applies the
pure policy's `Plan`, and resolves the waiting futures. A second loop polls
each pod's `/v1/state`; a pod that fails `failure_threshold` polls in a row
is dropped: calls in flight to it are abandoned and their tasks go back to
waiting for another pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from dispatcher.errors import PodBusyError, PodFailedError
from dispatcher.metrics import Metrics
from dispatcher.pods import Pod, PodClient, PodState
from dispatcher.scheduler import (
    DEFAULT_MODEL,
    Assign,
    Backlog,
    PendingTask,
    Plan,
    PodView,
    Policy,
    Prefetch,
    Reject,
)
from sdeks.aio import wait_event
from sdeks.callback import Callback
from sdeks.demand import DemandReport
from sdeks.errors import ModelNotFoundError
from sdeks.job import Job

log = logging.getLogger(__name__)

# `\Z`, not `$`: `$` also matches before a final newline.
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\Z")
_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".bin")
#: Model label values of `sdeks_dispatcher_backlog` per runtime (`Router._update_backlog`).
MAX_MODEL_LABELS = 32
MAX_LABEL_CHARS = 128
#: The label value that stands for every name not shown on its own.
OTHER_LABEL = "other"


def model_key(name: str | None) -> str:
    """A1111 names one checkpoint several ways: with or without extension, or `name [hash]`."""
    if not name:
        return DEFAULT_MODEL
    key = _HASH_SUFFIX.sub("", name.strip())
    for ext in _EXTENSIONS:
        if key.lower().endswith(ext):
            return key[: -len(ext)]
    return key


#: `_keys` of the tiers pods report, which repeat from poll to poll and are read on every
#: plan and backlog update: a regex per name each time was a millisecond per plan at 16 pods.
_KEYS_SEEN: dict[frozenset[str], frozenset[str]] = {}
_KEYS_SEEN_MAX = 4096


def _keys(names: Iterable[str]) -> frozenset[str]:
    if not isinstance(names, frozenset):
        return frozenset(model_key(n) for n in names)
    keys = _KEYS_SEEN.get(names)
    if keys is None:
        if len(_KEYS_SEEN) >= _KEYS_SEEN_MAX:
            _KEYS_SEEN.clear()
        keys = _KEYS_SEEN[names] = frozenset(model_key(n) for n in names)
    return keys


class Draining(Exception):
    """The dispatcher is stopping: a task still waiting for a pod is released instead."""


@dataclass(eq=False)
class _Waiter:
    key: str
    model: str
    enqueued_at: float
    future: asyncio.Future[Pod]
    received_at: float
    #: How it sits in its runtime's kept `Backlog` (the model with the default filled in).
    pending: PendingTask | None = None


class Router:
    def __init__(
        self,
        policy: Policy,
        client: PodClient,
        *,
        metrics: Metrics,
        state_interval_s: float = 2.0,
        failure_threshold: int = 3,
        clock: Callable[[], float] = time.time,
        share_demand: bool = True,
        replica_id: str | None = None,
    ) -> None:
        self.policy = policy
        self.client = client
        self.metrics = metrics
        self.state_interval_s = state_interval_s
        self.failure_threshold = failure_threshold
        self.clock = clock
        #: Report this replica's waiting tasks to the pods and plan with the others'.
        self.share_demand = share_demand
        #: This replica's name in its reports (unique per process).
        self.replica_id = replica_id or uuid.uuid4().hex[:16]
        self.pods: dict[str, dict[str, Pod]] = {}
        self.waiting: dict[str, dict[str, _Waiter]] = {}
        #: Per runtime, the waiting tasks as the policy reads them, kept up to date as
        #: tasks come and go (not rebuilt per plan), and the default model they assume.
        self._backlogs: dict[str, tuple[str, Backlog]] = {}
        #: Per runtime, waiting tasks per model label, and the gauge's series last set from
        #: them: kept as tasks come and go, so a metric update costs the models, not the tasks.
        self._counts: dict[str, dict[str, int]] = {}
        self._shown: dict[str, dict[str, int]] = {}
        self._changed = asyncio.Event()
        self._poll_now = asyncio.Event()
        self._background: set[asyncio.Task[object]] = set()
        self._seq = 0
        self._draining = False
        #: When the first first-call hold that kept a pod out of the last plan ends.
        self._hold_ends: float | None = None

    def check_open(self) -> None:
        """Raise `Draining` once the dispatcher is stopping (before costly work)."""
        if self._draining:
            raise Draining()

    def drain(self) -> None:
        """Hand out no more pods; every waiting task raises `Draining`."""
        self._draining = True
        for waiting in self.waiting.values():
            for waiter in waiting.values():
                if not waiter.future.done():
                    waiter.future.set_exception(Draining())

    # --- pods ---------------------------------------------------------------

    def set_pods(self, runtime: str, urls: Iterable[str]) -> None:
        """Discovery's view of a runtime. Unlisted pods take no new work; running jobs finish."""
        current = self.pods.setdefault(runtime, {})
        wanted = {u.rstrip("/") for u in urls}
        for url in wanted - set(current):
            current[url] = Pod(url=url, runtime=runtime)
            log.info("pod %s joined runtime %s", url, runtime)
        for url, pod in list(current.items()):
            pod.listed = url in wanted
            if not pod.listed and pod.inflight == 0:
                del current[url]
                log.info("pod %s left runtime %s", url, runtime)
        self._poll_now.set()
        self._changed.set()

    def _pod_failed(self, pod: Pod) -> None:
        # Unschedulable until a state poll succeeds again.
        pod.failures += 1
        pod.state = None
        self._poll_now.set()

    async def poll_states(self) -> None:
        """Refresh every pod's state; drop pods that stopped answering."""
        pods = [p for runtime in self.pods.values() for p in runtime.values()]
        reports: dict[str, DemandReport] = {}
        if self.share_demand:
            # Kept a few polls: a replica that stops reporting (it died) drops out.
            ttl = max(5.0, 3 * self.state_interval_s)
            for runtime in self.pods:
                reports[runtime] = DemandReport.of(self.replica_id, self.own_demand(runtime), ttl)
        sent = [reports.get(p.runtime) if p.demand_supported else None for p in pods]
        results = await asyncio.gather(
            *(self.client.state(p.url, r) for p, r in zip(pods, sent, strict=True)),
            return_exceptions=True,
        )
        for pod, result, report in zip(pods, results, sent, strict=True):
            if isinstance(result, PodState):
                if report is not None and result.demand is None:
                    log.info("pod %s relays no demand (an older runtime): polled with GET", pod.url)
                    pod.demand_supported = False
                if pod.gone.is_set():
                    pod.gone = asyncio.Event()
                    log.info("pod %s answers again", pod.url)
                pod.state = result
                held = result.reserved
                pod.held = (
                    (held.replica, model_key(held.model), self.clock() + held.for_s)
                    if held is not None and held.replica != self.replica_id
                    else None
                )
                pod.failures = 0
                pod.last_seen = self.clock()
                if pod.inflight == 0:
                    gpu = sorted(_keys(result.gpu))
                    if pod.active_model not in gpu:
                        pod.active_model = gpu[0] if gpu else None
            else:
                pod.failures += 1
                pod.state = None
                if pod.failures >= self.failure_threshold and not pod.gone.is_set():
                    log.warning(
                        "pod %s stopped answering (%s); dropping it and rescheduling its tasks",
                        pod.url,
                        result,
                    )
                    pod.gone.set()
        for runtime, pods_of in self.pods.items():
            self.metrics.pods.labels(runtime).set(sum(p.schedulable for p in pods_of.values()))
        self._changed.set()

    async def _poll_loop(self) -> None:
        while True:
            await self.poll_states()
            self._poll_now.clear()
            await wait_event(self._poll_now, self.state_interval_s)

    def own_demand(self, runtime: str) -> dict[str, int]:
        """This replica's waiting tasks of `runtime` per model, as its policy keys them."""
        kept = self._backlogs.get(runtime)
        if kept is not None:
            return {m: len(q) for m, q in kept[1].by_model.items() if q}
        counts: dict[str, int] = {}
        for waiter in self.waiting.get(runtime, {}).values():
            if not waiter.future.done():
                counts[waiter.model] = counts.get(waiter.model, 0) + 1
        return counts

    def others_demand(self, runtime: str) -> dict[str, int]:
        """The other replicas' waiting tasks per model, as the pods of `runtime` relay
        them: per model the largest any pod reports (a pod that just started knows
        fewer reports; every pod hears from every replica)."""
        out: dict[str, int] = {}
        if not self.share_demand:
            return out
        for pod in self.pods.get(runtime, {}).values():
            if pod.state is None or pod.state.demand is None or not pod.schedulable:
                continue
            for model, n in pod.state.demand.items():
                if n > out.get(model, 0):
                    out[model] = n
        return out

    # --- tasks --------------------------------------------------------------

    async def run_job(
        self, job: Job, *, enqueued_at: float, attempts: int, received_at: float | None = None
    ) -> Callback:
        """Run `job` on a pod chosen by the policy; retry on other pods after pod failures.

        Raises `PodFailedError` after `attempts` failed pods, `PodDuplicateError`
        when a pod already runs this task, `PodRejectedError`
        when a pod refuses the job itself, `ModelNotFoundError` when no pod can
        obtain the model.
        """
        runtime = job.task.runtime
        failures = 0
        while True:
            pod = await self._acquire(
                runtime, job.model, job.task.id, enqueued_at, received_at or self.clock()
            )
            started = time.monotonic()
            try:
                answer = await self._call(pod, self._signed(pod, job))
                self.metrics.job_seconds.labels(runtime).observe(time.monotonic() - started)
                return answer
            except PodBusyError as exc:
                if exc.reserved is not None:
                    # Another replica's first call (`sdeks.grace`): not full, and not a
                    # failure; plan again without switching the pod until it ends.
                    held = exc.reserved
                    pod.held = (held.replica, model_key(held.model), self.clock() + held.for_s)
                    self.metrics.reserved.labels(runtime).inc()
                    log.info(
                        "pod %s holds first call for replica %s; rescheduling",
                        pod.url,
                        held.replica,
                        extra={"task_id": job.task.id},
                    )
                    continue
                # Full (another replica filled it): plan without it for a while,
                # so the task can go elsewhere instead of knocking again.
                pod.full_until = self.clock() + max(1.0, 2 * self.state_interval_s)
                if pod.state is not None:
                    pod.state = replace(pod.state, free_slots=0)
                log.info("pod %s is full; rescheduling", pod.url, extra={"task_id": job.task.id})
            except PodFailedError as exc:
                failures += 1
                self._pod_failed(pod)
                log.warning(
                    "attempt %d/%d failed: %s",
                    failures,
                    attempts,
                    exc.message,
                    extra={"task_id": job.task.id},
                )
                if failures >= attempts:
                    raise
                self.metrics.pod_retries.labels(runtime).inc()
            finally:
                self._release(pod)

    def _signed(self, pod: Pod, job: Job) -> Job:
        """`job` naming this replica, for a pod that knows first call (`sdeks.grace`);
        an older runtime refuses fields it does not know, so it gets none."""
        if pod.state is None or not pod.state.first_call or job.replica == self.replica_id:
            return job
        return job.model_copy(update={"replica": self.replica_id})

    async def _call(self, pod: Pod, job: Job) -> Callback:
        """`client.submit`, abandoned if the pod is dropped meanwhile."""
        submit = asyncio.ensure_future(self.client.submit(pod.url, job))
        gone = asyncio.ensure_future(pod.gone.wait())
        try:
            await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not submit.done():
                submit.cancel()
        if submit.done() and not submit.cancelled():
            return submit.result()
        raise PodFailedError(
            f"pod {pod.url} was dropped while running job {job.task.id}",
            pod=pod.url,
            task_id=job.task.id,
        )

    async def _acquire(
        self, runtime: str, model: str | None, task_id: str, enqueued_at: float, received_at: float
    ) -> Pod:
        if self._draining:
            raise Draining()
        self._seq += 1
        key = f"{task_id}#{self._seq}"
        future: asyncio.Future[Pod] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(key, model_key(model), enqueued_at, future, received_at)
        self._wait(runtime, waiter)
        self._changed.set()
        try:
            pod = await future
        except asyncio.CancelledError:
            # Assigned, then cancelled before this coroutine resumed: give the slot back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())
            raise
        finally:
            self._unwait(runtime, key)
            self._update_backlog(runtime)
        self.metrics.dispatch_latency.labels(runtime).observe(max(0.0, self.clock() - received_at))
        return pod

    def _wait(self, runtime: str, waiter: _Waiter) -> None:
        self.waiting.setdefault(runtime, {})[waiter.key] = waiter
        counts = self._counts.setdefault(runtime, {})
        label = waiter.model or "default"
        counts[label] = counts.get(label, 0) + 1
        kept = self._backlogs.get(runtime)
        if kept is not None:
            waiter.pending = PendingTask(waiter.key, waiter.model or kept[0], waiter.enqueued_at)
            kept[1].add(waiter.pending)

    def _unwait(self, runtime: str, key: str) -> _Waiter | None:
        waiter = self.waiting.get(runtime, {}).pop(key, None)
        if waiter is not None:
            counts = self._counts.get(runtime, {})
            label = waiter.model or "default"
            if counts.get(label, 0) > 1:
                counts[label] -= 1
            else:
                counts.pop(label, None)
        kept = self._backlogs.get(runtime)
        if waiter is not None and waiter.pending is not None and kept is not None:
            kept[1].discard(waiter.pending)
        return waiter

    def _backlog(self, runtime: str, default: str) -> Backlog:
        """The runtime's kept backlog; built again only when the default model that
        tasks without a model stand for changed (pods reported another one)."""
        kept = self._backlogs.get(runtime)
        if kept is None or kept[0] != default:
            waiters = self.waiting.get(runtime, {}).values()
            for w in waiters:
                w.pending = PendingTask(w.key, w.model or default, w.enqueued_at)
            kept = (default, Backlog(w.pending for w in waiters if w.pending is not None))
            self._backlogs[runtime] = kept
        return kept[1]

    def _release(self, pod: Pod) -> None:
        pod.inflight = max(0, pod.inflight - 1)
        if pod.state is not None:
            # The slot is free now; waiting for the next poll to say so would idle the pod.
            pod.state = replace(
                pod.state, free_slots=min(pod.state.slots, pod.state.free_slots + 1)
            )
        if not pod.listed and pod.inflight == 0:
            self.pods.get(pod.runtime, {}).pop(pod.url, None)
        self._changed.set()

    # --- planning -----------------------------------------------------------

    async def run(self) -> None:
        """The planning loop (and the state poller beside it); cancel to stop."""
        poller = asyncio.create_task(self._poll_loop())
        try:
            while True:
                self._changed.clear()
                try:
                    wake_at = self.schedule()
                except Exception:  # a planning bug must not stall every task for good
                    self.metrics.errors.labels("planning").inc()
                    log.exception("planning failed; retrying in a second")
                    wake_at = None
                timeout = 1.0 if wake_at is None else min(1.0, max(0.0, wake_at - self.clock()))
                await wait_event(self._changed, timeout)
        finally:
            poller.cancel()
            for task in list(self._background):
                task.cancel()

    def schedule(self) -> float | None:
        """One planning pass over every runtime; returns the earliest wake-up asked for."""
        wakes = []
        self._hold_ends = None
        for runtime in list(self.waiting):
            plan = self._plan(runtime)
            if plan is not None:
                self._apply(runtime, plan)
                if plan.wake_at is not None:
                    wakes.append(plan.wake_at)
            if self._hold_ends is not None:
                wakes.append(self._hold_ends)
        return min(wakes) if wakes else None

    def _plan(self, runtime: str) -> Plan | None:
        if self._draining:
            return None
        if not any(not w.future.done() for w in self.waiting.get(runtime, {}).values()):
            return None
        now = self.clock()
        pods = [
            p for p in self.pods.get(runtime, {}).values() if p.schedulable and p.full_until <= now
        ]
        if any(p.held is not None for p in pods):
            kept_out = [p for p in pods if not self._may_use(runtime, p, now)]
            if kept_out:
                pods = [p for p in pods if p not in kept_out]
                # Plan again when the first hold ends, not at the next poll.
                self._hold_ends = min(p.held[2] for p in kept_out if p.held is not None)
        default = next(
            (model_key(p.state.default_model) for p in pods if p.state and p.state.default_model),
            DEFAULT_MODEL,
        )
        # A task whose future is done but not yet removed may still be in it: `_apply`
        # skips what it assigns to such a task, and the next plan no longer sees it.
        tasks = self._backlog(runtime, default)
        views = [
            PodView(
                name=p.url,
                free_slots=p.free_slots,
                active_model=p.active_model,
                gpu=_keys(p.state.gpu) if p.state else frozenset(),
                ram=_keys(p.state.ram) if p.state else frozenset(),
                disk=_keys(p.state.disk) if p.state else frozenset(),
                available=_keys(p.state.available)
                if p.state and p.state.available is not None
                else None,
            )
            for p in pods
        ]
        others: Mapping[str, int] = self.others_demand(runtime)
        return self.policy.plan(now, tasks, views, others)

    def _may_use(self, runtime: str, pod: Pod, now: float) -> bool:
        """False while another replica holds first call on `pod` (`sdeks.grace`) and this
        replica has no task of the pod's model: the holder's next job comes first."""
        if pod.held is None:
            return True
        _, model, until = pod.held
        if until <= now:
            pod.held = None
            return True
        kept = self._backlogs.get(runtime)
        if kept is not None:
            return bool(kept[1].by_model.get(model))
        return any(w.model == model for w in self.waiting.get(runtime, {}).values())

    @staticmethod
    def _held_for_other(pod: Pod, model: str, now: float) -> bool:
        return pod.held is not None and pod.held[2] > now and model_key(model) != pod.held[1]

    def _apply(self, runtime: str, plan: Plan) -> None:
        pods = self.pods.get(runtime, {})
        now = self.clock()
        for decision in plan.decisions:
            if isinstance(decision, Assign):
                pod = pods.get(decision.pod)
                if pod is not None and self._held_for_other(pod, decision.model, now):
                    continue  # it would switch a pod another replica holds: the task waits
                waiter = self._unwait(runtime, decision.task)
                if waiter is None or pod is None or waiter.future.done():
                    continue
                pod.inflight += 1
                if decision.switch:
                    self.metrics.switches.labels(runtime).inc()
                pod.active_model = decision.model
                if pod.last_prefetch == decision.model:
                    pod.last_prefetch = None  # hinted, now used: a later hint is news again
                waiter.future.set_result(pod)
            elif isinstance(decision, Reject):
                waiter = self._unwait(runtime, decision.task)
                if waiter is not None and not waiter.future.done():
                    waiter.future.set_exception(
                        ModelNotFoundError(f"model {decision.model!r}: {decision.reason}")
                    )
            elif isinstance(decision, Prefetch):
                pod = pods.get(decision.pod)
                if pod and pod.prefetch_supported and pod.last_prefetch != decision.model:
                    pod.last_prefetch = decision.model
                    self.metrics.prefetches.labels(runtime).inc()
                    self._spawn(self._prefetch(pod, decision.model))
        self._update_backlog(runtime)

    async def _prefetch(self, pod: Pod, model: str) -> None:
        if not await self.client.prefetch(pod.url, model):
            pod.prefetch_supported = False

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _update_backlog(self, runtime: str) -> None:
        """`sdeks_dispatcher_backlog{runtime, model}`, its model labels bounded: model
        names come from tasks (untrusted), and every label value is a series kept in
        memory here and in Prometheus. Models a pod of the runtime knows are always
        named; of the others, the largest backlogs until `MAX_MODEL_LABELS`, the rest
        under `OTHER_LABEL`. A model whose backlog drained loses its series."""
        gauge = self.metrics.backlog
        counts = self._counts.get(runtime, {})
        known = self._known_models(runtime)
        shown: dict[str, int] = {}
        for model, count in sorted(counts.items(), key=lambda mc: (mc[0] not in known, -mc[1])):
            named = model in known or (
                len(shown) < MAX_MODEL_LABELS - 1 and len(model) <= MAX_LABEL_CHARS
            )
            label = model if named else OTHER_LABEL
            shown[label] = shown.get(label, 0) + count
        before = self._shown.get(runtime, {})
        if shown == before:
            return
        for model in before.keys() - shown.keys():  # drop this runtime's models that drained
            with contextlib.suppress(KeyError):
                gauge.remove(runtime, model)
        for model, count in shown.items():
            if before.get(model) != count:
                gauge.labels(runtime, model).set(count)
        self._shown[runtime] = shown

    def _known_models(self, runtime: str) -> set[str]:
        known = {"default"}
        for pod in self.pods.get(runtime, {}).values():
            state = pod.state
            if state is not None:
                known |= _keys(state.gpu) | _keys(state.ram) | _keys(state.disk)
                known |= _keys(state.available or ())
        return known
