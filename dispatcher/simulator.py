"""A deterministic discrete-event simulator for the scheduling policies.

It drives a `dispatcher.scheduler.Policy` through the same `plan()` calls
the dispatcher makes, in virtual time: tasks arrive, pods render one job at a
time (`inference_time`, plus `switch_cost` when the job's model is not the
pod's active model), and the policy is asked again whenever a task arrives,
a pod finishes, or the policy asked to be woken. Same inputs, same result.

Driving it from a benchmark::

    from dispatcher.simulator import zipf_workload, simulate, lower_bound, compare
    from dispatcher.scheduler import AffinityPolicy, CostModel, FifoPolicy

    tasks = zipf_workload(n_tasks=2000, n_models=8, exponent=1.1, seed=0)
    fifo = simulate(FifoPolicy(), tasks, pods=4, inference_time=1, switch_cost=10)
    aff = simulate(AffinityPolicy(costs=CostModel.uniform(1, 10), max_wait=120), tasks,
                   pods=4, inference_time=1, switch_cost=10)
    aff.throughput / fifo.throughput, aff.makespan / lower_bound(tasks, 4, 1, 10)

    # or the whole grid at once, as rows ready to print:
    for row in compare(switch_costs=(0, 2, 10, 30)): print(row)

`SimResult` holds makespan, throughput, switches, and waits (max, mean, p95,
per model). `window` limits the policy's view to the oldest `window` waiting
tasks, like the dispatcher's bounded window of held messages (None: all).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from dispatcher.scheduler import (
    AffinityPolicy,
    Assign,
    Backlog,
    CostModel,
    FifoPolicy,
    PendingTask,
    PodView,
    Policy,
    Prefetch,
    Reject,
)


@dataclass(frozen=True)
class SimTask:
    key: str
    model: str
    arrival: float


@dataclass
class SimResult:
    policy: str
    n_tasks: int
    makespan: float
    switches: int
    waits: dict[str, float]  # task key -> seconds from arrival to start
    models: dict[str, str] = field(default_factory=dict)  # task key -> model
    rejected: int = 0
    prefetches: int = 0
    #: `plan()` calls and the CPU seconds they took (wall clock of the calls).
    plan_calls: int = 0
    plan_seconds: float = field(default=0.0, compare=False)

    @property
    def throughput(self) -> float:
        return self.n_tasks / self.makespan if self.makespan > 0 else math.inf

    @property
    def max_wait(self) -> float:
        return max(self.waits.values(), default=0.0)

    @property
    def mean_wait(self) -> float:
        return sum(self.waits.values()) / len(self.waits) if self.waits else 0.0

    @property
    def p95_wait(self) -> float:
        ordered = sorted(self.waits.values())
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0

    def max_wait_by_model(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for key, wait in self.waits.items():
            model = self.models[key]
            out[model] = max(out[model], wait)
        return dict(sorted(out.items()))


def zipf_workload(
    *,
    n_tasks: int = 2000,
    n_models: int = 8,
    exponent: float = 1.1,
    seed: int = 0,
    arrival_rate: float | None = None,
) -> list[SimTask]:
    """Tasks whose models follow Zipf(`exponent`) over `n_models` models.

    `arrival_rate` None: every task arrives at time 0 (a burst). Otherwise a
    Poisson process of that many tasks per time unit.
    """
    rng = random.Random(seed)
    weights = [1.0 / (k**exponent) for k in range(1, n_models + 1)]
    models = [f"model-{k}" for k in range(1, n_models + 1)]
    tasks = []
    now = 0.0
    for i in range(n_tasks):
        if arrival_rate:
            now += rng.expovariate(arrival_rate)
        tasks.append(SimTask(f"t{i:05d}", rng.choices(models, weights)[0], now))
    return tasks


def lower_bound(
    tasks: Sequence[SimTask], pods: int, inference_time: float, switch_cost: float
) -> float:
    """No schedule finishes sooner: all work spread evenly over the pods, each
    model loaded at least once (pods start empty), and the last arrival rendered."""
    if not tasks:
        return 0.0
    n_models = len({t.model for t in tasks})
    work = (len(tasks) * inference_time + n_models * switch_cost) / pods
    last = max(t.arrival for t in tasks) + inference_time
    return max(work, last, inference_time + switch_cost)


@dataclass
class _SimPod:
    name: str
    active: str | None = None
    busy_until: float | None = None
    #: The replica whose job runs on it.
    owner: int | None = None


@dataclass
class _Replica:
    """One dispatcher replica: the messages it holds (waiting and running)."""

    index: int
    waiting: dict[str, PendingTask] = field(default_factory=dict)
    backlog: Backlog = field(default_factory=Backlog)
    running: int = 0
    wake: float | None = None
    #: Received tasks since its last plan.
    fresh: bool = False

    def room(self, window: int | None) -> int:
        if window is None:
            return 1 << 30
        return window - len(self.waiting) - self.running


#: Messages one ReceiveMessage call returns at most (SQS).
_RECEIVE_BATCH = 10


def simulate(
    policy: Policy,
    tasks: Sequence[SimTask],
    *,
    pods: int = 4,
    inference_time: float = 1.0,
    switch_cost: float = 10.0,
    window: int | None = None,
    replicas: int = 1,
    initial_models: Sequence[str | None] | None = None,
    shared_view: bool = True,
    view_interval: float = 0.0,
) -> SimResult:
    """Run `tasks` through `policy` on `pods` identical single-slot pods.

    `replicas` dispatchers share the queue: each holds at most `window`
    messages (waiting and running, as `SDEKS_WINDOW` counts them; None: no
    limit), receives in batches of 10 in turn while it has room, and plans its
    own share onto the same pods, whose state every replica sees (polled).
    At one instant the replicas plan one after the other, each seeing the
    pods the ones before it took.

    `shared_view`: each replica also sees the others' waiting tasks per model
    (`others` of `Policy.plan`, what the pods relay in the live system), as of
    the last refresh: every `view_interval` time units (0: always current), so
    a replica may act on counts up to one poll old.
    """
    fleet = [_SimPod(f"pod-{i}") for i in range(pods)]
    for pod, model in zip(fleet, initial_models or [], strict=False):
        pod.active = model
    # Each pod's view, rebuilt only when the pod changes (not per plan).
    views = [_view(p) for p in fleet]
    arrivals = sorted(tasks, key=lambda t: (t.arrival, t.key))
    by_key = {t.key: t for t in arrivals}
    queue: list[SimTask] = []  # arrived, not yet received by any replica (oldest first)
    head = 0
    group = [_Replica(i) for i in range(max(1, replicas))]
    share = shared_view and len(group) > 1
    #: Waiting tasks per model over every replica (kept as they come and go).
    total: dict[str, int] = defaultdict(int)
    #: Per replica: the others' counts as last refreshed (view_interval > 0).
    snapshots: list[dict[str, int]] = [{} for _ in group]
    next_refresh = 0.0
    waits: dict[str, float] = {}
    switches = rejected = prefetches = plan_calls = 0
    plan_seconds = 0.0
    # Events: (time, order, kind, payload); kind 0 = pod done, 1 = arrival, 2 = wake,
    # 3 = the shared view refreshes.
    events: list[tuple[float, int, int, str]] = []
    order = 0
    for task in arrivals:
        heapq.heappush(events, (task.arrival, order, 1, task.key))
        order += 1
    now = 0.0
    last_finish = 0.0
    turn = 0
    receiver = 0

    def gone(replica: _Replica, job: PendingTask) -> None:
        replica.waiting.pop(job.key, None)
        replica.backlog.discard(job)
        total[job.model] -= 1

    while events:
        now = events[0][0]
        # Apply every event at this instant before asking the policy once per replica.
        first: int | None = None
        while events and events[0][0] == now:
            _, _, kind, payload = heapq.heappop(events)
            if kind == 1:
                queue.append(by_key[payload])
            elif kind == 0:
                index = int(payload)
                pod = fleet[index]
                if pod.owner is not None:
                    group[pod.owner].running -= 1
                    first = pod.owner if first is None else first
                pod.busy_until = pod.owner = None
                views[index] = _view(pod)
        # Receive: each replica in turn takes a batch while it has room.
        # The replica to receive first rotates: SQS hands a new message to any of
        # the replicas' long polls, not always to the same one.
        moved = True
        while head < len(queue) and moved:
            moved = False
            for replica in group[receiver:] + group[:receiver]:
                n = min(_RECEIVE_BATCH, replica.room(window), len(queue) - head)
                if n > 0:
                    for arrived in queue[head : head + n]:
                        pending = PendingTask(arrived.key, arrived.model, arrived.arrival)
                        replica.waiting[arrived.key] = pending
                        replica.backlog.add(pending)
                        total[pending.model] += 1
                    replica.fresh = True
                    head += n
                    moved = True
                    receiver = (replica.index + 1) % len(group)
        if share and view_interval > 0 and now >= next_refresh:
            for replica, snapshot in zip(group, snapshots, strict=True):
                snapshot.clear()
                for model, n in total.items():
                    rest = n - len(replica.backlog.by_model.get(model, ()))
                    if rest > 0:
                        snapshot[model] = rest
            next_refresh = now + view_interval
            if any(r.waiting for r in group):
                heapq.heappush(events, (next_refresh, order, 3, ""))
                order += 1
        # Plan: the replica whose job ended learns first; the others in turn.
        turn += 1
        start = first if first is not None else turn % len(group)
        for replica in group[start:] + group[:start]:
            if not replica.waiting:
                continue
            woken = replica.wake is not None and replica.wake <= now
            if woken:
                replica.wake = None
            if not (woken or replica.fresh or any(v.free_slots for v in views)):
                # No pod is free and nothing of its own changed: a plan could only
                # repeat its prefetch hints (the dispatcher asks anyway; it is cheap).
                continue
            replica.fresh = False
            others: Mapping[str, int] | None = None
            if share:
                others = (
                    snapshots[replica.index]
                    if view_interval > 0
                    else _Others(total, replica.backlog)
                )
            began = time.perf_counter()
            plan = policy.plan(now, replica.backlog, views, others)
            plan_seconds += time.perf_counter() - began
            plan_calls += 1
            for decision in plan.decisions:
                if isinstance(decision, Assign):
                    index = int(decision.pod.rsplit("-", 1)[1])
                    pod = fleet[index]
                    job = replica.waiting[decision.task]
                    gone(replica, job)
                    if pod.busy_until is not None:
                        raise RuntimeError(f"{policy.name} assigned {job.key} to busy {pod.name}")
                    cost = inference_time
                    if job.model != pod.active:
                        cost += switch_cost
                        switches += 1
                    pod.active = job.model
                    pod.busy_until = now + cost
                    pod.owner = replica.index
                    views[index] = _view(pod)
                    replica.running += 1
                    last_finish = max(last_finish, pod.busy_until)
                    waits[job.key] = now - job.enqueued_at
                    heapq.heappush(events, (pod.busy_until, order, 0, str(index)))
                    order += 1
                elif isinstance(decision, Reject):
                    dropped = replica.waiting.get(decision.task)
                    if dropped is not None:
                        gone(replica, dropped)
                    rejected += 1
                elif isinstance(decision, Prefetch):
                    prefetches += 1
            if plan.wake_at is not None and plan.wake_at > now and replica.wake != plan.wake_at:
                replica.wake = plan.wake_at
                heapq.heappush(events, (plan.wake_at, order, 2, ""))
                order += 1
        if not events and (head < len(queue) or any(r.waiting for r in group)):
            stuck = len(queue) - head + sum(len(r.waiting) for r in group)
            raise RuntimeError(
                f"{policy.name} left {stuck} tasks waiting with idle pods and no wake-up"
            )
    return SimResult(
        policy=policy.name,
        n_tasks=len(waits),
        makespan=last_finish,
        switches=switches,
        waits=waits,
        models={k: by_key[k].model for k in waits},
        rejected=rejected,
        prefetches=prefetches,
        plan_calls=plan_calls,
        plan_seconds=plan_seconds,
    )


def _view(pod: _SimPod) -> PodView:
    return PodView(
        name=pod.name,
        free_slots=0 if pod.busy_until is not None else 1,
        active_model=pod.active,
        gpu=frozenset({pod.active}) if pod.active else frozenset(),
    )


class _Others(Mapping[str, int]):
    """The other replicas' waiting tasks per model, read from the totals as they are."""

    def __init__(self, total: Mapping[str, int], own: Backlog) -> None:
        self._total = total
        self._own = own

    def __getitem__(self, model: str) -> int:
        n = self._total.get(model, 0) - len(self._own.by_model.get(model, ()))
        if n <= 0:
            raise KeyError(model)
        return n

    def get(self, model: str, default: int | None = None) -> int | None:  # type: ignore[override]
        n = self._total.get(model, 0) - len(self._own.by_model.get(model, ()))
        return n if n > 0 else default

    def __iter__(self) -> Iterator[str]:
        return (m for m in self._total if m in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def affinity_for(
    inference_time: float, switch_cost: float, *, max_wait: float | None = None
) -> AffinityPolicy:
    """The affinity policy with costs matching the simulated pods."""
    return AffinityPolicy(
        costs=CostModel.uniform(inference_time, switch_cost),
        max_wait=max_wait
        if max_wait is not None
        else default_max_wait(inference_time, switch_cost),
    )


def default_max_wait(inference_time: float, switch_cost: float) -> float:
    # Long enough for a pod to work through a model's batch, short enough that a
    # rare model is not starved: a few dozen jobs' worth, or a few switches.
    return max(60 * inference_time, 6 * switch_cost)


@dataclass(frozen=True)
class Row:
    switch_cost: float
    fifo_throughput: float
    affinity_throughput: float
    ratio: float
    fifo_makespan: float
    affinity_makespan: float
    lower_bound: float
    makespan_vs_bound: float
    fifo_switches: int
    affinity_switches: int
    fifo_max_wait: float
    affinity_max_wait: float


def compare(
    *,
    switch_costs: Sequence[float] = (0, 2, 10, 30),
    n_tasks: int = 2000,
    n_models: int = 8,
    exponent: float = 1.1,
    pods: int = 4,
    inference_time: float = 1.0,
    seed: int = 0,
    arrival_rate: float | None = None,
    window: int | None = None,
) -> list[Row]:
    """FIFO against affinity on one Zipf workload, one row per switch cost."""
    tasks = zipf_workload(
        n_tasks=n_tasks, n_models=n_models, exponent=exponent, seed=seed, arrival_rate=arrival_rate
    )
    rows = []
    for cost in switch_costs:
        common = {
            "pods": pods,
            "inference_time": inference_time,
            "switch_cost": cost,
            "window": window,
        }
        fifo = simulate(FifoPolicy(), tasks, **common)  # type: ignore[arg-type]
        aff = simulate(affinity_for(inference_time, cost), tasks, **common)  # type: ignore[arg-type]
        bound = lower_bound(tasks, pods, inference_time, cost)
        rows.append(
            Row(
                switch_cost=cost,
                fifo_throughput=fifo.throughput,
                affinity_throughput=aff.throughput,
                ratio=aff.throughput / fifo.throughput,
                fifo_makespan=fifo.makespan,
                affinity_makespan=aff.makespan,
                lower_bound=bound,
                makespan_vs_bound=aff.makespan / bound,
                fifo_switches=fifo.switches,
                affinity_switches=aff.switches,
                fifo_max_wait=fifo.max_wait,
                affinity_max_wait=aff.max_wait,
            )
        )
    return rows
