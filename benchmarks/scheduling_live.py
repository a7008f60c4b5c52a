"""Scheduling, live: the Zipf workload of benchmarks/scheduling.py through the real dispatcher.

`python -m dispatcher` (`--dispatchers` processes, each `SDEKS_POLICY=fifo` or
`affinity`, each with the default window for its fleet unless `--window`)
consumes the runtime queue of a moto server process and routes to `--pods`
sleeping pod doubles (`benchmarks._common`, all in one asyncio process; a
pod answers 429 when its one slot is taken): a job sleeps `inference` time
units, plus `S` when its model is not the pod's active model, and the pod's
`GET /v1/state` reports its active model on the GPU tier, as a real pod's
does. One time unit is `--time-unit` real seconds (default 0.02 s), so the
simulator's workload runs in seconds; the dispatcher's cost settings are the
same numbers in seconds (`SDEKS_INFERENCE_ESTIMATE_S` = inference x unit,
`SDEKS_LOAD_*_S` = S x unit, `SDEKS_MAX_WAIT_S` = the simulator's
`default_max_wait` x unit).

A burst, as the simulator's: the pods report no free slot until `T0`; the
dispatcher is started first, the tasks are sent to the queue in the shape SNS
delivers, stamped as published at `T0`, and the dispatcher takes its window
of them; at `T0` the pods open. Time 0 is the first job's start; `skew` is how
much later than `T0` that was (tasks look older than in the simulator by
that much). Throughput, makespan and waits are in time units, from the pods'
own clocks; the simulator's result for the same workload and window
(one replica holding `window` messages, running ones included, as the
dispatcher's window does) is printed beside each live row.

The dispatchers open when they hold the burst (their windows full), as the
simulator's replicas do at t=0. Each run checks that the pods ran every task;
`again` counts jobs run a second time (a lease lost, the message received
again); `shares` is how many tasks each dispatcher completed; `idle ms` is
the median time a pod stood idle between two jobs - the dispatchers'
turn-around as the pods see it, which must stay well below one unit for the
figures to be the policy's and not the machine's.

    python benchmarks/scheduling.py --live             # 2000 tasks, S in 0,2,10,30: ~10 min
    python benchmarks/scheduling.py --live --quick     # 200 tasks, S=10 only: ~30 s
    python benchmarks/scheduling_live.py --tasks 500 --time-unit 0.05 --window 256
    python benchmarks/scheduling_live.py --fleet       # 16 pods, 32 models, 2 dispatchers
    python benchmarks/scheduling_live.py --fleet --quick   # 320 tasks, affinity only (tests)

Last line: `affinity/fifo throughput at S=10: X.XX (live)`; with `--fleet` (or
without FIFO) `affinity makespan / lower bound at S=10, P pods, K dispatchers:
X.XXX (live)`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    FIRST_CALL_S,
    RUNTIME,
    DispatcherProcess,
    MotoServer,
    PodFleet,
    cpu_seconds,
    envelope,
    machine,
    percentile,
    sns_notification,
    table,
    wait_until,
    workdir,
)
from benchmarks.scheduling import HEADER as SIM_HEADER
from benchmarks.scheduling import default_window
from dispatcher.scheduler import FifoPolicy, HolderFirstPolicy
from dispatcher.simulator import (
    SimTask,
    affinity_for,
    default_max_wait,
    lower_bound,
    simulate,
    zipf_workload,
)

DEFAULT_TIME_UNIT = 0.02
#: How often the dispatcher polls pod state here (its default is 2 s = 100 units).
DEFAULT_STATE_INTERVAL_S = 0.2
#: `--fleet`: the issue's fleet size, a burst through several dispatcher processes.
FLEET = {"pods": 16, "models": 32, "dispatchers": 2, "tasks": 4000}
#: `--fleet`'s time unit. A unit must dwarf the dispatchers' turn-around (a pod's idle time
#: between two jobs, `idle ms`): on the shared 2-core machine that was 26 ms at 0.5 s (5%),
#: 74 ms at 0.2 s and about 100 ms at 0.1 s, where 16 pods ask for 160 jobs/s.
FLEET_TIME_UNIT = 0.5
#: `--fleet --quick`'s: seconds for the smoke test, not accuracy.
FLEET_QUICK_TIME_UNIT = 0.1
#: `--fleet --quick` (the tests): the fleet's shape, few tasks, affinity only.
FLEET_QUICK = {"tasks": 320}

#: The simulated benchmark's columns, with the run kind and live-only ones.
HEADER = [
    *SIM_HEADER[:2],
    "run",
    *SIM_HEADER[2:],
    "429s",
    "again",
    "skew",
    "idle ms",
    "cpu ms/task",
    "shares",
]
POLICIES = ("fifo", "affinity")


#: The benchmark queues' visibility timeout (the stack's is 60 s).
VISIBILITY_TIMEOUT_S = 900
#: Threads sending the burst: each SendMessageBatch waits on moto, so several overlap.
FILL_THREADS = 4


def fill(sqs: Any, url: str, topic_arn: str, tasks: list[SimTask], published_at: float) -> None:
    """The burst, in SNS's delivery shape, stamped as published at `published_at`."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(FILL_THREADS) as pool:
        batches = range(0, len(tasks), 10)
        list(
            pool.map(
                lambda i: _send_batch(sqs, url, topic_arn, tasks[i : i + 10], published_at), batches
            )
        )


def _send_batch(
    sqs: Any, url: str, topic_arn: str, batch: list[SimTask], published_at: float
) -> None:
    entries = [
        {
            "Id": str(j),
            "MessageBody": sns_notification(
                envelope(t.key, model=t.model, steps=20),
                topic_arn=topic_arn,
                published_at=published_at,
            ),
        }
        for j, t in enumerate(batch)
    ]
    answer = sqs.send_message_batch(QueueUrl=url, Entries=entries)
    if answer.get("Failed"):
        raise RuntimeError(f"send failed: {answer['Failed'][:3]}")


def calibrate_fill(moto: MotoServer, tasks: list[SimTask]) -> float:
    """A safe first guess of how fast the burst is sent and held (messages/s), from sending
    part of it to a queue nobody reads: the real fill shares moto with the receiving
    dispatchers, and a guess too high stamps the burst before it is held (skew)."""
    stack = moto.new_stack(visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    sample = tasks[: min(len(tasks), 400)]
    began = time.time()
    fill(moto.client("sqs"), stack.queues[RUNTIME], stack.task_topic_arn, sample, began)
    return 0.25 * len(sample) / max(1e-3, time.time() - began)


def live_run(
    moto: MotoServer,
    fleet: PodFleet,
    work: Path,
    tasks: list[SimTask],
    *,
    policy: str,
    cost: float,
    args: argparse.Namespace,
    unit: float,
    window: int,
    state_interval_s: float,
    fill_rate: list[float],
) -> dict[str, Any]:
    """One policy at one switch cost through `args.dispatchers` processes; results in units."""
    # Heartbeats every VisibilityTimeout / 3: at the stack's 60 s, 4000 held messages cost
    # moto (on the same cores) 20 calls/s; on AWS that is SQS's work (docs/dispatcher.md).
    stack = moto.new_stack(visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    fleet.reset(
        open_at=time.time() + 3600,
        unit=unit,
        inference=args.inference,
        switch=cost,
        first_call_s=getattr(args, "first_call", FIRST_CALL_S),
    )
    settings = {
        "policy": policy,
        "window": window,
        "receive_wait_s": 1,
        "state_interval_s": state_interval_s,
        "inference_estimate_s": args.inference * unit,
        "load_ram_s": cost * unit,
        "load_disk_s": cost * unit,
        "load_remote_s": cost * unit,
        "max_wait_s": default_max_wait(args.inference, cost) * unit,
        "log_level": "WARNING",
    }
    sim_makespan = simulate(
        FifoPolicy(), tasks, pods=args.pods, inference_time=args.inference, switch_cost=cost
    ).makespan
    with contextlib.ExitStack() as running:
        group = [
            running.enter_context(
                DispatcherProcess(work, moto, stack, fleet.urls, name=f"dispatcher-{i}", **settings)
            )
            for i in range(args.dispatchers)
        ]
        d = _Group(group)
        wait_until(
            lambda: all(g.metric("sdeks_dispatcher_pods") >= len(fleet.urls) for g in group),
            timeout_s=30,
            what="pods polled by every dispatcher",
        )
        # Stamp the burst at T0 = when the fill should be over (from the pace of earlier fills).
        started = time.time()
        t0 = started + len(tasks) / fill_rate[0] + 0.5
        sqs = moto.client("sqs")
        cpu_before = [cpu_seconds(g.pid) for g in group]
        fill(sqs, stack.queues[RUNTIME], stack.task_topic_arn, tasks, t0)
        filled = time.time()
        # Open when the dispatchers hold the burst (their windows full), as the simulator's
        # replicas do at t=0: opening earlier would measure how fast they receive.
        held = min(len(tasks), window * args.dispatchers)
        wait_until(
            lambda: d.metric("sdeks_dispatcher_backlog") >= held,
            timeout_s=60 + len(tasks) / 20,
            what=f"{held} tasks held by the dispatchers",
            interval_s=0.25,
        )
        ready = time.time()
        fill_rate[0] = 0.7 * len(tasks) / (ready - started)
        open_at = max(t0, ready)
        fleet.reset(
            open_at=open_at,
            unit=unit,
            inference=args.inference,
            switch=cost,
            first_call_s=getattr(args, "first_call", FIRST_CALL_S),
        )
        try:
            # Asked of the pods: a scrape of a dispatcher's /metrics takes its event loop
            # for milliseconds, which would be charged to its turn-around.
            wait_until(
                lambda: fleet.done() >= len(tasks),
                timeout_s=120 + 3 * sim_makespan * unit,
                what=f"{len(tasks)} tasks through the dispatcher ({policy}, S={cost:g})",
                interval_s=0.25,
            )
            wait_until(
                lambda: d.metric("sdeks_dispatcher_jobs_total", outcome="done") >= len(tasks),
                timeout_s=60,
                what=f"{len(tasks)} tasks completed by the dispatchers",
                interval_s=0.25,
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{d.log_tail()}") from exc
        cpu = sum(cpu_seconds(g.pid) - b for g, b in zip(group, cpu_before, strict=True))
        shares = [int(g.metric("sdeks_dispatcher_jobs_total", outcome="done")) for g in group]
    records = fleet.records()
    ran = {r["id"] for r in records}
    if ran != {t.key for t in tasks}:
        raise RuntimeError(f"pods ran {len(ran)} distinct ids of {len(tasks)} tasks")
    first = min(r["start"] for r in records)
    waits = [(r["start"] - first) / unit for r in records]
    makespan = (max(r["end"] for r in records) - first) / unit
    return {
        "throughput": len(tasks) / makespan,
        # Jobs beyond one per task: a lease lost and the message received again (SQS is
        # at least once; the task table, off here, would stop the second render).
        "again": len(records) - len(tasks),
        "makespan": makespan,
        "p50": percentile(waits, 50),
        "p95": percentile(waits, 95),
        "max": max(waits),
        "switches": sum(bool(r["switch"]) for r in records),
        "refused": fleet.refused(),
        "reserved": fleet.reserved(),
        "skew": (first - t0) / unit,
        "idle_ms": 1e3 * percentile(idle_gaps(records), 50),
        "cpu_ms": 1e3 * cpu / len(tasks),
        "shares": shares,
        "fill_s": filled - started,
        "held_s": ready - started,
    }


def idle_gaps(records: list[dict[str, Any]]) -> list[float]:
    """Seconds each pod stood idle between the end of one job and the start of its next:
    the dispatchers' turn-around as the pods see it (in a burst a next task always waits)."""
    by_pod: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_pod.setdefault(r["pod"], []).append(r)
    gaps = []
    for jobs in by_pod.values():
        jobs.sort(key=lambda r: r["start"])
        gaps += [max(0.0, b["start"] - a["end"]) for a, b in zip(jobs, jobs[1:], strict=False)]
    return gaps


class _Group:
    """Several dispatcher processes read as one: metrics summed, logs joined."""

    def __init__(self, members: list[DispatcherProcess]) -> None:
        self.members = members

    def metric(self, name: str, **labels: str) -> float:
        return sum(m.metric(name, **labels) for m in self.members)

    def log_tail(self) -> str:
        return "\n".join(m.log_tail(1500) for m in self.members)


def row(cost: float, policy: str, run: str, r: dict[str, Any], bound: float) -> list[str]:
    live = run == "live"
    return [
        f"{cost:g}",
        policy,
        run,
        f"{r['throughput']:.3f}",
        f"{r['makespan']:.0f}",
        f"{bound:.0f}",
        f"{r['makespan'] / bound:.3f}",
        f"{r['p50']:.0f}",
        f"{r['p95']:.0f}",
        f"{r['max']:.0f}",
        str(r["switches"]),
        str(r["refused"]) if live else "-",
        str(r["again"]) if live else "-",
        f"{r['skew']:.0f}" if live else "-",
        f"{r['idle_ms']:.1f}" if live else "-",
        f"{r['cpu_ms']:.2f}" if live else "-",
        "/".join(map(str, r["shares"])) if live else "-",
    ]


def sim_result(
    policy: Any, tasks: list[SimTask], args: argparse.Namespace, cost: float, window: int | None
) -> dict[str, Any]:
    result = simulate(
        policy,
        tasks,
        pods=args.pods,
        inference_time=args.inference,
        switch_cost=cost,
        window=window,
        replicas=args.dispatchers,
    )
    waits = list(result.waits.values())
    return {
        "throughput": result.throughput,
        "makespan": result.makespan,
        "p50": percentile(waits, 50),
        "p95": result.p95_wait,
        "max": result.max_wait,
        "switches": result.switches,
    }


def configure(args: argparse.Namespace) -> None:
    """Fill in what `benchmarks/scheduling.py --live` does not set, and `--fleet`'s sizes."""
    for name, default in (
        ("fleet", False),
        ("dispatchers", 1),
        ("time_unit", None),
        ("window", None),
        ("state_interval", None),
        ("policies", None),
        ("switch_costs_given", None),
    ):
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    if args.time_unit is None:
        args.time_unit = DEFAULT_TIME_UNIT
        if args.fleet:
            args.time_unit = FLEET_QUICK_TIME_UNIT if args.quick else FLEET_TIME_UNIT
    args.state_interval = args.state_interval or DEFAULT_STATE_INTERVAL_S
    if args.quick and args.switch_costs_given is None:
        args.switch_costs = [10.0] if 10.0 in args.switch_costs else args.switch_costs[-1:]
    if args.policies is None:
        args.policies = ["affinity"] if args.fleet and args.quick else list(POLICIES)


def run_live(args: argparse.Namespace) -> int:
    """`benchmarks/scheduling.py --live`: `args` as that script (or this one) parses them."""
    configure(args)
    unit = args.time_unit
    window = args.window or default_window(args.pods)
    costs = list(args.switch_costs)
    tasks = zipf_workload(
        n_tasks=args.tasks, n_models=args.models, exponent=args.exponent, seed=args.seed
    )
    print(f"# machine: {machine()}")
    print(
        f"# live burst: {args.tasks} tasks, {args.pods} sleeping pod doubles, "
        f"{args.dispatchers} dispatcher process(es), {args.models} models "
        f"Zipf({args.exponent:g}), inference {args.inference:g}, seed {args.seed}; 1 unit = "
        f"{unit:g} s; dispatcher window {window} each, state poll every "
        f"{args.state_interval:g} s"
    )
    print(
        f"# sim rows: the simulator on the same workload, {args.dispatchers} replica(s) each "
        f"holding {window} messages (running ones included) of a disjoint share of the queue, "
        "as the dispatchers' windows; holder-first (Ray Serve's rule) is simulated only"
    )
    rows: list[list[str]] = []
    ratios: dict[float, float] = {}
    bounds: dict[float, float] = {}
    fifo_bounds: dict[float, float] = {}
    fill_rate = [0.0]  # messages/s sent and held: calibrated, then revised after each run
    with workdir() as work:
        with (
            MotoServer(work) as moto,
            PodFleet(work, kind="sleep", count=args.pods, slots=1) as fleet,
        ):
            fill_rate[0] = calibrate_fill(moto, tasks)
            for cost in costs:
                bound = lower_bound(tasks, args.pods, args.inference, cost)
                live = {
                    policy: live_run(
                        moto,
                        fleet,
                        work,
                        tasks,
                        policy=policy,
                        cost=cost,
                        args=args,
                        unit=unit,
                        window=window,
                        state_interval_s=args.state_interval,
                        fill_rate=fill_rate,
                    )
                    for policy in args.policies
                }
                sims = {
                    "fifo": sim_result(FifoPolicy(), tasks, args, cost, window),
                    "holder-first": sim_result(HolderFirstPolicy(), tasks, args, cost, window),
                    "affinity": sim_result(
                        affinity_for(args.inference, cost), tasks, args, cost, window
                    ),
                }
                for policy in ("fifo", "holder-first", "affinity"):
                    if policy in live:
                        rows.append(row(cost, policy, "live", live[policy], bound))
                    if policy in live or policy == "holder-first":
                        rows.append(row(cost, policy, "sim", sims[policy], bound))
                note = [
                    f"{p} sent in {r['fill_s']:.1f} s, held in {r['held_s']:.1f} s, "
                    f"{r['reserved']} of its 429s reserved"
                    for p, r in live.items()
                ]
                if "affinity" in live:
                    bounds[cost] = live["affinity"]["makespan"] / bound
                    note.append(
                        f"affinity makespan / bound {bounds[cost]:.3f} live, "
                        f"{sims['affinity']['makespan'] / bound:.3f} sim"
                    )
                if "fifo" in live:
                    fifo_bounds[cost] = live["fifo"]["makespan"] / bound
                if "affinity" in live and "fifo" in live:
                    ratios[cost] = live["affinity"]["throughput"] / live["fifo"]["throughput"]
                    sim_ratio = sims["affinity"]["throughput"] / sims["fifo"]["throughput"]
                    note.append(f"live ratio {ratios[cost]:.2f}, sim ratio {sim_ratio:.2f}")
                print(f"# S={cost:g}: " + "; ".join(note), flush=True)
    print()
    print(table(rows, HEADER))
    print(
        "\n# times in units; waits from the first job's start; 429s: jobs a pod refused (full, "
        "or `reserved`: first call for the other replica); "
        "again: jobs run a second time; skew: first start - T0; idle ms: median time a pod stood idle between two jobs; "
        "cpu ms/task: the dispatcher processes' CPU time (all together) per task, from the "
        "fill to the last job; shares: tasks each dispatcher completed; every task ran (checked)"
    )
    headline = 10.0 if 10.0 in costs else costs[-1]
    for cost, ratio in ratios.items():
        print(
            f"# affinity/fifo throughput at S={cost:g}: {ratio:.2f} (live); affinity makespan "
            f"/ lower bound {bounds[cost]:.3f}"
        )
    if headline in ratios and not args.fleet:
        print(f"affinity/fifo throughput at S={headline:g}: {ratios[headline]:.2f} (live)")
    else:
        policy = "affinity" if headline in bounds else args.policies[-1]
        ratio = bounds[headline] if headline in bounds else fifo_bounds[headline]
        print(
            f"{policy} makespan / lower bound at S={headline:g}, {args.pods} pods, "
            f"{args.dispatchers} dispatchers: {ratio:.3f} (live)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 tasks, S=10 only (the tests)")
    parser.add_argument(
        "--fleet",
        action="store_true",
        help=(
            f"{FLEET['pods']} pods, {FLEET['models']} models, {FLEET['dispatchers']} "
            f"dispatchers, {FLEET['tasks']} tasks, S=10, 1 unit = {FLEET_TIME_UNIT:g} s "
            "(each overridable); with --quick: affinity only, "
            f"{FLEET_QUICK['tasks']} tasks"
        ),
    )
    parser.add_argument("--tasks", type=int, default=None, help="default 2000")
    parser.add_argument("--pods", type=int, default=None, help="default 4")
    parser.add_argument("--models", type=int, default=None, help="default 8")
    parser.add_argument(
        "--zipf", "--exponent", dest="exponent", type=float, default=1.1, help="Zipf exponent"
    )
    parser.add_argument("--inference", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--switch-costs",
        dest="switch_costs_given",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="default 0,2,10,30 (quick, fleet: 10)",
    )
    parser.add_argument(
        "--policies",
        type=lambda s: [p for p in s.split(",") if p],
        default=None,
        help="comma-separated, of fifo,affinity (default both; fleet quick: affinity)",
    )
    parser.add_argument(
        "--time-unit",
        type=float,
        default=None,
        help=f"seconds (default {DEFAULT_TIME_UNIT:g}; fleet {FLEET_TIME_UNIT:g})",
    )
    parser.add_argument(
        "--window", type=int, default=None, help="SDEKS_WINDOW (default: the fleet's default)"
    )
    parser.add_argument(
        "--dispatchers", type=int, default=None, help="dispatcher processes (default 1)"
    )
    parser.add_argument(
        "--state-interval", type=float, default=DEFAULT_STATE_INTERVAL_S, help="seconds"
    )
    parser.add_argument(
        "--first-call",
        type=float,
        default=FIRST_CALL_S,
        help=f"the pods' first call for the replica whose job ended, seconds (default "
        f"{FIRST_CALL_S:g}, the runtime's; 0: off)",
    )
    args = parser.parse_args(argv)
    sizes = {"pods": 4, "models": 8, "dispatchers": 1, "tasks": 2000}
    if args.fleet:
        sizes = {**FLEET, **(FLEET_QUICK if args.quick else {})}
    elif args.quick:
        sizes["tasks"] = 200
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and not args.fleet:
        args.tasks = min(args.tasks, 200)
    for policy in args.policies or ():
        if policy not in POLICIES:
            parser.error(f"--policies: {policy!r} is not one of {', '.join(POLICIES)}")
    if args.dispatchers < 1:
        parser.error(f"--dispatchers must be at least 1, got {args.dispatchers}")
    default_costs = [10.0] if args.fleet else [0.0, 2.0, 10.0, 30.0]
    args.switch_costs = args.switch_costs_given or default_costs
    return run_live(args)


if __name__ == "__main__":
    sys.exit(main())
