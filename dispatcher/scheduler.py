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

import bisect
import heapq
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

#: Model key of tasks that name no checkpoint (the runtime's default).
DEFAULT_MODEL = ""


@dataclass(frozen=True)
class PendingTask:
    key: str
    model: str
    #: When the task was published (or first seen), on the policy's clock.
    enqueued_at: float


#: Oldest first; ties by key, so every policy is deterministic.
_order = attrgetter("enqueued_at", "key")


class Backlog:
    """Waiting tasks grouped by model, each model's oldest first.

    A caller that keeps one up to date (`add`, `discard`) hands it to `plan`
    as it is, so a plan reads only the heads of the models it touches instead
    of sorting every waiting task again; a plain sequence of tasks is grouped
    on the way in. Policies never modify it.
    """

    def __init__(self, tasks: Iterable[PendingTask] = ()) -> None:
        self.by_model: dict[str, list[PendingTask]] = defaultdict(list)
        for task in tasks:
            self.by_model[task.model].append(task)
        for queue in self.by_model.values():
            queue.sort(key=_order)

    @classmethod
    def of(cls, tasks: Sequence[PendingTask] | Backlog) -> Backlog:
        return tasks if isinstance(tasks, Backlog) else cls(tasks)

    def add(self, task: PendingTask) -> None:
        queue = self.by_model[task.model]
        if not queue or _order(queue[-1]) <= _order(task):
            queue.append(task)  # the usual case: tasks arrive in order
        else:
            bisect.insort(queue, task, key=_order)

    def discard(self, task: PendingTask) -> None:
        queue = self.by_model.get(task.model)
        if not queue:
            return
        i = bisect.bisect_left(queue, _order(task), key=_order)
        if i < len(queue) and queue[i].key == task.key:
            del queue[i]
            if not queue:
                del self.by_model[task.model]

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_model.values())

    def __iter__(self) -> Iterator[PendingTask]:
        return heapq.merge(*self.by_model.values(), key=_order)


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

    def plan(
        self,
        now: float,
        tasks: Sequence[PendingTask] | Backlog,
        pods: Sequence[PodView],
        others: Mapping[str, int] | None = None,
    ) -> Plan: ...


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

    def plan(
        self,
        now: float,
        tasks: Sequence[PendingTask] | Backlog,
        pods: Sequence[PodView],
        others: Mapping[str, int] | None = None,
    ) -> Plan:
        queue = iter(Backlog.of(tasks))
        return _fill(pods, lambda _pod: next(queue, None))


def _fill(pods: Sequence[PodView], pick: Callable[[PodView], PendingTask | None]) -> Plan:
    """Each free slot, pods in name order, takes the task `pick` gives it (None: no more)."""
    plan = Plan()
    for pod in sorted(pods, key=lambda p: p.name):
        for _ in range(pod.free_slots):
            task = pick(pod)
            if task is None:
                return plan
            switch = task.model != pod.active_model
            plan.decisions.append(Assign(task.key, pod.name, task.model, switch))
            pod = _with_model(pod, task.model)
    return plan


@dataclass(frozen=True)
class HolderFirstPolicy:
    """Ray Serve's model-multiplexing rule: a free pod takes the oldest task of a
    model it holds, otherwise the oldest task (switching)."""

    name: str = "holder-first"

    def plan(
        self,
        now: float,
        tasks: Sequence[PendingTask] | Backlog,
        pods: Sequence[PodView],
        others: Mapping[str, int] | None = None,
    ) -> Plan:
        backlog = Backlog.of(tasks)
        taken = Counter[str]()  # per model: how many of its oldest are assigned
        heads = [(_order(q[0]), m) for m, q in backlog.by_model.items()]
        heapq.heapify(heads)

        def take(model: str) -> PendingTask:
            queue = backlog.by_model[model]
            task = queue[taken[model]]
            taken[model] += 1
            return task

        def pick(pod: PodView) -> PendingTask | None:
            own = pod.active_model
            if own is not None and taken[own] < len(backlog.by_model.get(own, ())):
                return take(own)
            # The heap's entries go stale as models are taken from: refresh lazily.
            while heads:
                key, model = heads[0]
                queue = backlog.by_model[model]
                if taken[model] >= len(queue):
                    heapq.heappop(heads)
                elif _order(queue[taken[model]]) != key:
                    heapq.heapreplace(heads, (_order(queue[taken[model]]), model))
                else:
                    return take(model)
            return None

        return _fill(pods, pick)


@dataclass(frozen=True)
class AffinityPolicy:
    """Model affinity with a wait bound; see the module docstring for the rules."""

    costs: CostModel = field(default_factory=CostModel)
    max_wait: float = 300.0
    #: A switch must be paid back: expected work per server of the model it opens
    #: (x inference time) must reach this many times its load cost.
    switch_factor: float = 1.0
    name: str = "affinity"

    def plan(
        self,
        now: float,
        tasks: Sequence[PendingTask] | Backlog,
        pods: Sequence[PodView],
        others: Mapping[str, int] | None = None,
    ) -> Plan:
        """`others`: per model, the tasks other dispatcher replicas hold waiting (their
        reports through the pods). They count in every judgement of a model's backlog
        (is it worth a load, how many servers it deserves, does a pod's model still
        have work); only this replica's own `tasks` are assigned."""
        state = _State(now, tasks, pods, self.costs, others)
        plan = Plan()

        # 1. Fail fast: no pod can obtain the model.
        catalogs = [p.available for p in pods]
        if pods and all(c is not None for c in catalogs):
            known = frozenset().union(*catalogs)  # type: ignore[arg-type]
            for model in state.models():
                if model != DEFAULT_MODEL and model not in known:
                    for task in state.drop(model):
                        plan.decisions.append(
                            Reject(task.key, model, "no pod of this runtime can obtain the model")
                        )

        if state.free_pods():
            self._assign(state, plan)

        # 5. Prefetch for busy pods about to run out of their model.
        order: list[str] | None = None
        for pod in state.pods.values():
            if pod.free_slots > 0 or pod.active_model is None:
                continue
            if state.demand(pod.active_model) > 0:
                continue
            if order is None:
                order = self._prefetch_order(state)
            choice = self._prefetch_choice(state, pod, order)
            if choice is not None and choice not in pod.ram and not pod.holds(choice):
                plan.decisions.append(Prefetch(pod.name, choice))

        plan.wake_at = self._wake_at(state)
        return plan

    def _assign(self, state: _State, plan: Plan) -> None:
        """Rules 2-4: hand the free pods out."""
        now = state.now
        # 2. Max wait: overdue tasks of unserved models get the least harmful free pod.
        # Overdue also means older than what pods serve now by half the bound: in
        # a burst every task is as old as the rest, and serving one model first
        # shortens no wait, it only adds switches.
        models = state.models()
        oldest = {m: state.oldest(m) for m in models}
        served = [oldest[m] for m in models if state.servers[m] > 0]
        reference = now - min(served, default=now)
        overdue = [
            m
            for m in models
            if state.servers[m] == 0
            and now - oldest[m] >= self.max_wait
            and now - oldest[m] - reference >= self.max_wait / 2
        ]
        for model in sorted(overdue, key=lambda m: (oldest[m], m)):
            wait = now - state.oldest(model)
            candidates = [
                p for p in state.free_pods() if state.may_leave(p, wait, self.max_wait / 2)
            ]
            if candidates:
                pod = min(candidates, key=lambda p: (state.harm(p, model), p.name))
                plan.decisions.append(state.assign(pod, model))

        # 3. Affinity: a free pod with tasks of its model in view stays (or spreads).
        for name in [p.name for p in state.free_pods()]:
            while state.pods[name].free_slots > 0 and state.own(state.pods[name]) > 0:
                stay = self._choose(state, state.pods[name])
                assert stay is not None
                plan.decisions.append(state.assign(state.pods[name], stay))
        # A free pod whose model this replica has no task of, but other replicas
        # have: left free for them (they send at their next plan) rather than
        # switched away, at most one pod per task they hold.
        held: Counter[str] = Counter()
        free = []
        for pod in state.free_pods():
            active = pod.active_model
            if active is not None and held[active] < state.others_of(active):
                held[active] += 1
            else:
                free.append(pod)
        # 4. Switching: one switch at a time, the most pressing model onto the
        #    pod that loads it cheapest, until every free pod is used or waits.
        #    Each free pod ranks the models once (a heap); an assignment changes
        #    the keys of two models only (the one opened, the one left), so a
        #    pod's top entry is checked again when read, and the model left is
        #    offered anew: O(pods x models) per plan, not per switch.
        ranks = {p.name: self._ranking(state, p) for p in free}
        while True:
            best: tuple[tuple[float, ...], str, str] | None = None
            for name in list(ranks):
                top = self._top(state, state.pods[name], ranks[name])
                if top is None:
                    del ranks[name]
                elif best is None or (top[0], name) > (best[0], best[1]):
                    best = (top[0], name, top[1])
            if best is None:
                break
            _, name, model = best
            left = state.pods[name].active_model
            plan.decisions.append(state.assign(state.pods[name], model))
            while state.pods[name].free_slots > 0 and state.own(state.pods[name]) > 0:
                plan.decisions.append(state.assign(state.pods[name], model))  # more slots
            if state.pods[name].free_slots <= 0:
                del ranks[name]
            for other, heap in ranks.items():
                for changed in (left, model) if other == name else (left,):
                    if changed is None:
                        continue
                    key = self._candidate(state, state.pods[other], changed)
                    if key is not None:
                        heapq.heappush(heap, (_neg(key), changed))

    def _choose(self, state: _State, pod: PodView) -> str | None:
        """The model `pod`'s next free slot serves, or None to leave it free."""
        current = pod.active_model
        if current is None or state.count[current] <= 0:
            return self._target(state, pod)
        # Spread: leave a model others also serve for one no pod serves, when that
        # one's tasks pay for the load and outnumber what stays per server here.
        if state.servers[current] >= 2:
            mine = state.demand(current) / (state.servers[current] - 1)
            for model in state.unserved():
                if state.demand(model) <= mine:
                    break  # sorted by demand: none further is worth it
                if state.servers[model] > 0 or state.count[model] <= 0:
                    continue  # opened meanwhile in this plan
                if self._key(state, pod, model)[0] >= 1.0:
                    return model
        return current

    def _ranking(self, state: _State, pod: PodView) -> list[tuple[tuple[float, ...], str]]:
        heap = []
        for model in state.models():
            key = self._candidate(state, pod, model)
            if key is not None:
                heap.append((_neg(key), model))
        heapq.heapify(heap)
        return heap

    def _top(
        self, state: _State, pod: PodView, heap: list[tuple[tuple[float, ...], str]]
    ) -> tuple[tuple[float, ...], str] | None:
        """The best entry of a pod's ranking, its key checked against the state now."""
        while heap:
            stored, model = heap[0]
            key = self._candidate(state, pod, model)
            if key is None:
                heapq.heappop(heap)
            elif _neg(key) != stored:
                heapq.heapreplace(heap, (_neg(key), model))
            else:
                return key, model
        return None

    def _target(self, state: _State, pod: PodView) -> str | None:
        """The model `pod` would switch to: the most expected work per server
        once it joins, among the models whose work pays for the load."""
        best: tuple[tuple[float, ...], str] | None = None
        for model in state.models():
            key = self._candidate(state, pod, model)
            if key is not None and (best is None or (key, model) > best):
                best = (key, model)
        return None if best is None else best[1]

    def _prefetch_order(self, state: _State) -> list[str]:
        """Models by their switch priority for a pod that holds none of them (one
        ranking per plan for every busy pod: a hint need not weigh each pod's tiers)."""
        bar = self.switch_factor * state.costs.remote / state.costs.inference
        servers, demand = state.servers, state.demand
        keys = []
        for model in state.models():
            d, n = demand(model), servers[model]
            keys.append((float(n == 0 and d >= bar), d / (n + 1), model))
        return [k[2] for k in heapq.nlargest(_PREFETCH_TRIES, keys)]

    def _prefetch_choice(self, state: _State, pod: PodView, order: list[str]) -> str | None:
        for model in order:
            if self._candidate(state, pod, model) is not None:
                return model
        return None

    def _candidate(self, state: _State, pod: PodView, model: str) -> tuple[float, ...] | None:
        """`model`'s priority for `pod` to switch to, or None when it should not."""
        if model == pod.active_model or state.count[model] <= 0:
            return None
        servers = state.servers[model]
        load = state.costs.load(pod, model)
        opens, share, age = self._key(state, pod, model, load)
        if servers > 0 and share * state.costs.inference < self.switch_factor * load:
            return None  # the servers it has finish sooner than this pod could help
        return (opens, share, age, -load)

    def _key(
        self, state: _State, pod: PodView, model: str, load: float | None = None
    ) -> tuple[float, float, float]:
        """Priority of `model` for `pod`: its expected work per server once the pod joins."""
        joins = 0 if model == pod.active_model else 1
        servers = state.servers[model]
        demand = state.demand(model)
        # A model no pod serves comes first once its expected work pays for a load.
        if load is None:
            load = state.costs.load(pod, model)
        opens = servers == 0 and demand * state.costs.inference >= (self.switch_factor * load)
        return (float(opens), demand / (servers + joins), -state.oldest(model))

    def _wake_at(self, state: _State) -> float | None:
        """The next time a wait bound trips without any event."""
        servers, oldest = state.servers, state.oldest
        soonest = min((oldest(m) for m in state.models() if servers[m] == 0), default=math.inf)
        soonest += self.max_wait
        return soonest if state.now < soonest < math.inf else None


#: Models a busy pod's prefetch hint is chosen among (the top of one ranking).
_PREFETCH_TRIES = 8


def _neg(key: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(-x for x in key)


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
    """The mutable working copy one `AffinityPolicy.plan` call reasons over.

    It reads the tasks through a `Backlog` and only counts what it takes, so a
    plan costs O(pods x models) on a kept backlog (plus O(tasks) to group a
    plain sequence).
    """

    def __init__(
        self,
        now: float,
        tasks: Sequence[PendingTask] | Backlog,
        pods: Sequence[PodView],
        costs: CostModel,
        others: Mapping[str, int] | None = None,
    ) -> None:
        self.now = now
        self.costs = costs
        self.backlog = Backlog.of(tasks)
        #: Other replicas' waiting tasks per model: non-negative ints, bounded by
        #: whoever built the mapping (the router checks what pods relay).
        self.others: Mapping[str, int] = others if others is not None else {}
        #: Per model: how many of its oldest tasks this plan has assigned or failed.
        self.taken: Counter[str] = Counter()
        self.count: Counter[str] = Counter({m: len(q) for m, q in self.backlog.by_model.items()})
        self._models = [m for m, n in self.count.items() if n > 0]
        self.pods = {p.name: p for p in sorted(pods, key=lambda p: p.name)}
        self.servers: Counter[str] = Counter(
            p.active_model for p in self.pods.values() if p.active_model is not None
        )
        self._unserved: list[str] | None = None

    def own(self, pod: PodView) -> int:
        return self.count[pod.active_model] if pod.active_model is not None else 0

    def others_of(self, model: str) -> int:
        """Tasks of `model` other replicas hold waiting (0 when unknown)."""
        return self.others.get(model, 0)

    def demand(self, model: str) -> int:
        """Tasks of `model` waiting anywhere: this replica's not yet taken, and the others'."""
        return self.count[model] + self.others.get(model, 0)

    def oldest(self, model: str) -> float:
        queue = self.backlog.by_model.get(model)
        if not queue:
            return math.inf
        taken = self.taken.get(model)
        if taken is None:
            return queue[0].enqueued_at
        return queue[taken].enqueued_at if taken < len(queue) else math.inf

    def unserved(self) -> list[str]:
        """Models with tasks and no pod, most demand first (computed once per plan)."""
        if self._unserved is None:
            self._unserved = sorted(
                (m for m in self.models() if self.servers[m] == 0),
                key=lambda m: (-self.demand(m), self.oldest(m), m),
            )
        return self._unserved

    def models(self) -> list[str]:
        """Models with tasks of this replica waiting (at the plan's start; callers
        that need it check `count`, which assignments lower)."""
        return self._models

    def drop(self, model: str) -> list[PendingTask]:
        tasks = self.backlog.by_model[model][self.taken[model] :]
        self.taken[model] += len(tasks)
        self.count[model] = 0
        return tasks

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
        if current is None or self.count[current] <= 0 or self.servers[current] >= 2:
            return True
        return wait - (self.now - self.oldest(current)) >= margin

    def harm(self, pod: PodView, model: str) -> tuple[float, ...]:
        current = pod.active_model
        orphans = current is not None and self.demand(current) > 0 and self.servers[current] <= 1
        return (float(orphans), self.costs.load(pod, model), -self.servers[current or ""], 0.0)

    def assign(self, pod: PodView, model: str) -> Assign:
        task = self.backlog.by_model[model][self.taken[model]]
        self.taken[model] += 1
        self.count[model] -= 1
        switch = model != pod.active_model
        if switch:
            if pod.active_model is not None:
                self.servers[pod.active_model] -= 1
            self.servers[model] += 1
        self.pods[pod.name] = _with_model(pod, model)
        return Assign(task.key, pod.name, model, switch)
