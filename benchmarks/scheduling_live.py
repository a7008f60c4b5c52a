"""Scheduling, live: the Zipf workload of benchmarks/scheduling.py through the real dispatcher.

`python -m dispatcher` (its own process, `SDEKS_POLICY=fifo` or `affinity`)
consumes the runtime queue of a moto server process and routes to `--pods`
sleeping pod doubles (`benchmarks._common`): a job sleeps `inference` time
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

    python benchmarks/scheduling.py --live             # 2000 tasks, S in 0,2,10,30: ~10 min
    python benchmarks/scheduling.py --live --quick     # 200 tasks, S=10 only: ~30 s
    python benchmarks/scheduling_live.py --tasks 500 --time-unit 0.05 --window 256

Last line: `affinity/fifo throughput at S=10: X.XX (live)`.
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
    RUNTIME,
    DispatcherProcess,
    MotoServer,
    PodFleet,
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
from dispatcher.scheduler import FifoPolicy
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

#: The simulated benchmark's columns, with the run kind and two live-only ones.
HEADER = [*SIM_HEADER[:2], "run", *SIM_HEADER[2:], "429s", "skew"]


def fill(sqs: Any, url: str, topic_arn: str, tasks: list[SimTask], published_at: float) -> None:
    """The burst, in SNS's delivery shape, stamped as published at `published_at`."""
    for i in range(0, len(tasks), 10):
        entries = [
            {
                "Id": str(j),
                "MessageBody": sns_notification(
                    envelope(t.key, model=t.model, steps=20),
                    topic_arn=topic_arn,
                    published_at=published_at,
                ),
            }
            for j, t in enumerate(tasks[i : i + 10])
        ]
        answer = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        if answer.get("Failed"):
            raise RuntimeError(f"send failed: {answer['Failed'][:3]}")


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
    """One policy at one switch cost; results in time units."""
    stack = moto.new_stack()
    fleet.reset(open_at=time.time() + 3600, unit=unit, inference=args.inference, switch=cost)
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
    dispatchers = getattr(args, "dispatchers", 1) or 1
    with contextlib.ExitStack() as running:
        group = [
            running.enter_context(
                DispatcherProcess(work, moto, stack, fleet.urls, name=f"dispatcher-{i}", **settings)
            )
            for i in range(dispatchers)
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
        fill(sqs, stack.queues[RUNTIME], stack.task_topic_arn, tasks, t0)
        filled = time.time()
        fill_rate[0] = min(fill_rate[0], 0.8 * len(tasks) / (filled - started))
        open_at = max(t0, filled)
        fleet.reset(open_at=open_at, unit=unit, inference=args.inference, switch=cost)
        try:
            wait_until(
                lambda: d.metric("sdeks_dispatcher_jobs_total", outcome="done") >= len(tasks),
                timeout_s=120 + 3 * sim_makespan * unit,
                what=f"{len(tasks)} tasks through the dispatcher ({policy}, S={cost:g})",
                interval_s=0.25,
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{d.log_tail()}") from exc
    records = fleet.records()
    if len(records) != len(tasks):
        raise RuntimeError(f"pods ran {len(records)} jobs for {len(tasks)} tasks")
    first = min(r["start"] for r in records)
    waits = [(r["start"] - first) / unit for r in records]
    makespan = (max(r["end"] for r in records) - first) / unit
    return {
        "throughput": len(records) / makespan,
        "makespan": makespan,
        "p50": percentile(waits, 50),
        "p95": percentile(waits, 95),
        "max": max(waits),
        "switches": sum(bool(r["switch"]) for r in records),
        "refused": fleet.refused(),
        "skew": (first - t0) / unit,
    }


class _Group:
    """Several dispatcher processes read as one: metrics summed, logs joined."""

    def __init__(self, members: list[DispatcherProcess]) -> None:
        self.members = members

    def metric(self, name: str, **labels: str) -> float:
        return sum(m.metric(name, **labels) for m in self.members)

    def log_tail(self) -> str:
        return "\n".join(m.log_tail(1500) for m in self.members)


def row(cost: float, policy: str, run: str, r: dict[str, Any], bound: float) -> list[str]:
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
        str(r.get("refused", "-")),
        f"{r['skew']:.0f}" if "skew" in r else "-",
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
        replicas=getattr(args, "dispatchers", 1) or 1,
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


def run_live(args: argparse.Namespace) -> int:
    """`benchmarks/scheduling.py --live`: `args` as that script parses them."""
    unit = getattr(args, "time_unit", None) or DEFAULT_TIME_UNIT
    window = getattr(args, "window", None) or default_window(args.pods)
    state_interval_s = getattr(args, "state_interval", None) or DEFAULT_STATE_INTERVAL_S
    costs = list(args.switch_costs)
    if args.quick and getattr(args, "switch_costs_given", None) is None:
        costs = [10.0] if 10.0 in costs else costs[-1:]
    tasks = zipf_workload(
        n_tasks=args.tasks, n_models=args.models, exponent=args.exponent, seed=args.seed
    )
    print(f"# machine: {machine()}")
    print(
        f"# live burst: {args.tasks} tasks, {args.pods} sleeping pod doubles, "
        f"{getattr(args, 'dispatchers', 1) or 1} dispatcher process(es), {args.models} models "
        f"Zipf({args.exponent}), inference {args.inference:g}, seed {args.seed}; 1 unit = "
        f"{unit:g} s; dispatcher window {window}, state poll every {state_interval_s:g} s"
    )
    print(
        f"# sim rows: the simulator on the same workload, {getattr(args, 'dispatchers', 1) or 1} "
        f"replica(s) each holding {window} messages (running ones included), as the "
        "dispatcher's window"
    )
    rows: list[list[str]] = []
    ratios: dict[float, float] = {}
    bounds: dict[float, float] = {}
    fill_rate = [300.0]  # messages/s, revised down after each fill
    with workdir() as work:
        with (
            MotoServer(work) as moto,
            PodFleet(work, kind="sleep", count=args.pods, slots=1) as fleet,
        ):
            for cost in costs:
                bound = lower_bound(tasks, args.pods, args.inference, cost)
                live = {}
                for policy in ("fifo", "affinity"):
                    live[policy] = live_run(
                        moto,
                        fleet,
                        work,
                        tasks,
                        policy=policy,
                        cost=cost,
                        args=args,
                        unit=unit,
                        window=window,
                        state_interval_s=state_interval_s,
                        fill_rate=fill_rate,
                    )
                sim_window = window
                sims = {
                    "fifo": sim_result(FifoPolicy(), tasks, args, cost, sim_window),
                    "affinity": sim_result(
                        affinity_for(args.inference, cost), tasks, args, cost, sim_window
                    ),
                }
                for policy in ("fifo", "affinity"):
                    rows.append(row(cost, policy, "live", live[policy], bound))
                    rows.append(row(cost, policy, "sim", sims[policy], bound))
                ratios[cost] = live["affinity"]["throughput"] / live["fifo"]["throughput"]
                bounds[cost] = live["affinity"]["makespan"] / bound
                sim_ratio = sims["affinity"]["throughput"] / sims["fifo"]["throughput"]
                print(
                    f"# S={cost:g}: live ratio {ratios[cost]:.2f}, sim ratio {sim_ratio:.2f}",
                    flush=True,
                )
    print()
    print(table(rows, HEADER))
    print(
        "\n# times in units; waits from the first job's start; 429s: jobs a pod refused (full); "
        "skew: first start - T0"
    )
    for cost, ratio in ratios.items():
        print(
            f"# affinity/fifo throughput at S={cost:g}: {ratio:.2f} (live); affinity makespan "
            f"/ lower bound {bounds[cost]:.3f}"
        )
    headline = 10.0 if 10.0 in ratios else costs[-1]
    print(f"affinity/fifo throughput at S={headline:g}: {ratios[headline]:.2f} (live)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 tasks, S=10 only (the tests)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--exponent", type=float, default=1.1)
    parser.add_argument("--inference", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--switch-costs",
        dest="switch_costs_given",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="default 0,2,10,30 (quick: 10)",
    )
    parser.add_argument("--time-unit", type=float, default=DEFAULT_TIME_UNIT, help="seconds")
    parser.add_argument(
        "--window", type=int, default=None, help="SDEKS_WINDOW (default: the fleet's default)"
    )
    parser.add_argument("--dispatchers", type=int, default=1, help="dispatcher processes")
    parser.add_argument(
        "--state-interval", type=float, default=DEFAULT_STATE_INTERVAL_S, help="seconds"
    )
    args = parser.parse_args(argv)
    args.switch_costs = args.switch_costs_given or [0.0, 2.0, 10.0, 30.0]
    if args.quick:
        args.tasks = min(args.tasks, 200)
    return run_live(args)


if __name__ == "__main__":
    sys.exit(main())
