"""Scheduling policies: which waiting task goes to which pod. Pure and I/O-free.

A policy sees a snapshot - the waiting tasks of one runtime and its pods -
and returns a `Plan`: assignments, prefetch hints, tasks to fail, and the
time at which it wants to be asked again even if nothing happens. The
dispatcher (`routing.py`) and the simulator (`simulator.py`) both drive
policies through this one interface, so what is measured is what runs.

`AffinityPolicy` (the default) exists because loading a checkpoint takes
10-30 s on a GPU while rendering takes a few: a pod keeps serving the model
it holds, and switches only when that is worth it:

1. Fail fast: a task whose model no pod can obtain (every pod reports its
   catalog and none lists the model) is failed at once.
2. Max wait: the oldest task that has waited `max_wait` or longer and whose
   model no pod serves gets a pod now, switching the free pod that loses
   least (cheapest load, then a model that others also serve).
3. Affinity: a free pod takes the oldest task of its active model. A pod
   whose model others also serve may instead open an unserved model when
   that model's pressure (backlog x inference time + oldest wait) exceeds
   the cost of loading it there.
4. Switching: a free pod with nothing left of its model switches to the
   model with the most backlog per server, if that model has no server or
   its backlog outweighs the switch (R x inference > k x load cost).
   Loading is cheapest from GPU, then RAM, then disk, then the bucket.
5. Prefetch: a busy pod whose model has no more waiting tasks is told the
   model it will most likely switch to, so it can load it into RAM meanwhile.

`FifoPolicy` is the reference it is measured against: each free pod takes the
oldest task, switching whenever the model differs.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

#: Model key of tasks that name no checkpoint (the runtime's default).
DEFAULT_MODEL = ""


@dataclass(frozen=True)
class PendingTask:
    key: str
    model: str
    #: When the task was published (or first seen), on the policy's clock.
    enqueued_at: float


@dataclass(frozen=True)
class PodView:
    name: str
    free_slots: int
    #: The model the pod renders with now or was last given, if any.
    active_model: str | None = None
    gpu: frozenset[str] = frozenset()
    ram: frozenset[str] = frozenset()
    disk: frozenset[str] = frozenset()
    #: Every model the pod can obtain; None when it does not say.
    available: frozenset[str] | None = None

    def holds(self, model: str) -> bool:
        return model == self.active_model or model in self.gpu


@dataclass(frozen=True)
class Assign:
    task: str
    pod: str
    model: str
    switch: bool


@dataclass(frozen=True)
class Prefetch:
    pod: str
    model: str


@dataclass(frozen=True)
class Reject:
    task: str
    model: str
    reason: str


Decision = Assign | Prefetch | Reject


@dataclass
class Plan:
    decisions: list[Decision] = field(default_factory=list)
    #: Ask again at this time even if nothing changes (a wait bound or pressure will trip).
    wake_at: float | None = None

    @property
    def assignments(self) -> list[Assign]:
        return [d for d in self.decisions if isinstance(d, Assign)]


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def plan(self, now: float, tasks: Sequence[PendingTask], pods: Sequence[PodView]) -> Plan: ...


@dataclass(frozen=True)
class CostModel:
    """Estimated seconds: one inference, and making a model active from each tier."""

    inference: float = 5.0
    gpu: float = 0.0
    ram: float = 3.0
    disk: float = 15.0
    remote: float = 30.0

    @classmethod
    def uniform(cls, inference: float, switch: float) -> CostModel:
        """Every switch costs the same, whatever tier the model sits on (the simulator's pods)."""
        return cls(inference=inference, gpu=0.0, ram=switch, disk=switch, remote=switch)

    def load(self, pod: PodView, model: str) -> float:
        if pod.holds(model):
            return self.gpu
        if model in pod.ram:
            return self.ram
        if model in pod.disk:
            return self.disk
        return self.remote


@dataclass(frozen=True)
class FifoPolicy:
    """Each free pod takes the oldest task and switches if needed."""

    name: str = "fifo"

    def plan(self, now: float, tasks: Sequence[PendingTask], pods: Sequence[PodView]) -> Plan:
        queue = sorted(tasks, key=lambda t: (t.enqueued_at, t.key))
        plan = Plan()
        position = 0
        for pod in sorted(pods, key=lambda p: p.name):
            for _ in range(pod.free_slots):
                if position >= len(queue):
                    return plan
                task = queue[position]
                position += 1
                switch = task.model != pod.active_model
                plan.decisions.append(Assign(task.key, pod.name, task.model, switch))
                pod = _with_model(pod, task.model)
        return plan


@dataclass(frozen=True)
class AffinityPolicy:
    """Model affinity with a wait bound; see the module docstring for the rules."""

    costs: CostModel = field(default_factory=CostModel)
    max_wait: float = 300.0
    #: Pressure must exceed this many times the load cost to open a model on a busy pod's behalf.
    switch_factor: float = 1.0
    name: str = "affinity"

    def plan(self, now: float, tasks: Sequence[PendingTask], pods: Sequence[PodView]) -> Plan:
        state = _State(now, tasks, pods, self.costs)
        plan = Plan()

        # 1. Fail fast: no pod can obtain the model.
        catalogs = [p.available for p in pods]
        if pods and all(c is not None for c in catalogs):
            known = frozenset().union(*catalogs)  # type: ignore[arg-type]
            for task in list(state.waiting):
                if task.model != DEFAULT_MODEL and task.model not in known:
                    state.remove(task)
                    plan.decisions.append(
                        Reject(task.key, task.model, "no pod of this runtime can obtain the model")
                    )

        # 2. Max wait: overdue tasks of unserved models get the least harmful free pod.
        for task in sorted(state.waiting, key=lambda t: (t.enqueued_at, t.key)):
            if now - task.enqueued_at < self.max_wait or state.servers[task.model] > 0:
                continue
            wait = now - task.enqueued_at
            candidates = [
                p for p in state.free_pods() if state.may_leave(p, wait, self.max_wait / 2)
            ]
            if not candidates:
                continue
            pod = min(candidates, key=lambda p: state.harm(p, task.model))
            plan.decisions.append(state.assign(pod, task.model))

        # 3 + 4. Affinity first; then one switch at a time, the most pressing
        # model onto the pod that loads it cheapest, until nothing moves.
        while True:
            for pod in state.free_pods():
                current = pod.active_model
                while pod.free_slots > 0 and current is not None and state.backlog[current] > 0:
                    target = self._stay_or_spread(state, pod)
                    plan.decisions.append(state.assign(pod, target))
                    pod = state.pods[pod.name]
                    current = pod.active_model
            best: tuple[tuple[float, ...], PodView, str] | None = None
            for pod in state.free_pods():
                choice = self._next_model(state, pod)
                if choice is not None and (best is None or choice[0] > best[0]):
                    best = (choice[0], pod, choice[1])
            if best is None:
                break
            plan.decisions.append(state.assign(best[1], best[2]))

        # 5. Prefetch for busy pods about to run out of their model.
        for pod in state.pods.values():
            if pod.free_slots > 0 or pod.active_model is None:
                continue
            if state.backlog[pod.active_model] > 0:
                continue
            choice = self._next_model(state, pod)
            if choice is not None and choice[1] not in pod.ram and not pod.holds(choice[1]):
                plan.decisions.append(Prefetch(pod.name, choice[1]))

        plan.wake_at = self._wake_at(state)
        return plan

    def _stay_or_spread(self, state: _State, pod: PodView) -> str:
        current = pod.active_model
        assert current is not None
        # Spread: leave a model others also serve for an unserved one under pressure.
        if state.servers[current] >= 2:
            best = state.best_unserved(pod, self.switch_factor)
            if best is not None:
                return best
        return current

    def _next_model(self, state: _State, pod: PodView) -> tuple[tuple[float, ...], str] | None:
        """The model a pod with nothing of its own to do should switch to, with its priority."""
        best: tuple[float, ...] | None = None
        choice = None
        for model, count in state.backlog.items():
            if count <= 0 or model == pod.active_model:
                continue
            servers = state.servers[model]
            load = state.costs.load(pod, model)
            if servers > 0 and count * state.costs.inference <= servers * load:
                continue  # the servers it has finish sooner than this pod could help
            key = (float(servers == 0), count / (servers + 1), -state.oldest(model), -load)
            if best is None or key > best:
                best, choice = key, model
        return None if best is None or choice is None else (best, choice)

    def _wake_at(self, state: _State) -> float | None:
        """The next time a wait bound or a pressure threshold trips without any event."""
        times = []
        for model, count in state.backlog.items():
            if count <= 0 or state.servers[model] > 0:
                continue
            oldest = state.oldest(model)
            times.append(oldest + self.max_wait)
            cheapest = min((state.costs.load(p, model) for p in state.pods.values()), default=0.0)
            pressure_due = oldest + self.switch_factor * cheapest - count * state.costs.inference
            if pressure_due > state.now:
                times.append(pressure_due)
        future = [t for t in times if t > state.now]
        return min(future) if future else None


def _with_model(pod: PodView, model: str) -> PodView:
    return PodView(
        name=pod.name,
        free_slots=max(0, pod.free_slots - 1),
        active_model=model,
        gpu=pod.gpu | {model},
        ram=pod.ram,
        disk=pod.disk,
        available=pod.available,
    )


class _State:
    """The mutable working copy one `AffinityPolicy.plan` call reasons over."""

    def __init__(
        self, now: float, tasks: Sequence[PendingTask], pods: Sequence[PodView], costs: CostModel
    ) -> None:
        self.now = now
        self.costs = costs
        self.by_model: dict[str, list[PendingTask]] = defaultdict(list)
        for task in sorted(tasks, key=lambda t: (t.enqueued_at, t.key)):
            self.by_model[task.model].append(task)
        self.backlog: Counter[str] = Counter({m: len(ts) for m, ts in self.by_model.items()})
        self.pods = {p.name: p for p in sorted(pods, key=lambda p: p.name)}
        self.servers: Counter[str] = Counter(
            p.active_model for p in self.pods.values() if p.active_model is not None
        )

    @property
    def waiting(self) -> list[PendingTask]:
        return [t for ts in self.by_model.values() for t in ts]

    def oldest(self, model: str) -> float:
        tasks = self.by_model.get(model)
        return tasks[0].enqueued_at if tasks else math.inf

    def remove(self, task: PendingTask) -> None:
        self.by_model[task.model].remove(task)
        self.backlog[task.model] -= 1

    def free_pods(self) -> list[PodView]:
        return [p for p in self.pods.values() if p.free_slots > 0]

    def may_leave(self, pod: PodView, wait: float, margin: float) -> bool:
        """May `pod` drop its model for a task that has waited `wait`?

        Yes when nothing of its model waits, when another pod serves it too, or
        when the task has waited `margin` longer than anything of its model.
        The margin is what stops two starving models from taking a pod back
        and forth on every job.
        """
        current = pod.active_model
        if current is None or self.backlog[current] <= 0 or self.servers[current] >= 2:
            return True
        return wait - (self.now - self.oldest(current)) >= margin

    def harm(self, pod: PodView, model: str) -> tuple[float, ...]:
        current = pod.active_model
        orphans = current is not None and self.backlog[current] > 0 and self.servers[current] <= 1
        return (float(orphans), self.costs.load(pod, model), -self.servers[current or ""], 0.0)

    def best_unserved(self, pod: PodView, factor: float) -> str | None:
        best = None
        best_key: tuple[float, ...] | None = None
        for model, count in self.backlog.items():
            if count <= 0 or self.servers[model] > 0:
                continue
            load = self.costs.load(pod, model)
            pressure = count * self.costs.inference + (self.now - self.oldest(model))
            if pressure < factor * load:
                continue
            key = (pressure, -self.oldest(model))
            if best_key is None or key > best_key:
                best, best_key = model, key
        return best

    def assign(self, pod: PodView, model: str) -> Assign:
        task = self.by_model[model].pop(0)
        self.backlog[model] -= 1
        switch = model != pod.active_model
        if switch:
            if pod.active_model is not None:
                self.servers[pod.active_model] -= 1
            self.servers[model] += 1
        self.pods[pod.name] = _with_model(pod, model)
        return Assign(task.key, pod.name, model, switch)
