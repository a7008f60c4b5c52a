"""Scheduling: the real affinity policy against FIFO, simulated pods, virtual time.

FIFO is the reference design's behaviour: each free pod takes the oldest task
and switches model if it must. Ours is `dispatcher.scheduler.AffinityPolicy`,
the same object the dispatcher runs, driven here by the deterministic
discrete-event simulator `dispatcher.simulator`.

Workload (defaults = the issue's): 4 pods, 8 models with Zipf(1.1)
popularity, 2000 tasks, inference time 1, switch cost S in {0, 2, 10, 30}.
Part 1 is a burst (every task queued at t=0: throughput and makespan); part 2
is Poisson arrivals at 80% of the pods' capacity (the wait bound under load);
part 3 is the burst again with the policy seeing only what the dispatcher's
window holds (`SDEKS_WINDOW` messages, less one per running task).

    python benchmarks/scheduling.py            # full run, ~30 s
    python benchmarks/scheduling.py --quick    # 200 tasks, a few seconds
    python benchmarks/scheduling.py --live     # the real dispatcher, moto, sleeping pods

The last line is the headline: `affinity/fifo throughput at S=10: X.XX`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import table
from dispatcher.scheduler import FifoPolicy
from dispatcher.settings import DispatcherSettings
from dispatcher.simulator import (
    SimResult,
    affinity_for,
    default_max_wait,
    lower_bound,
    simulate,
    zipf_workload,
)


def p50(result: SimResult) -> float:
    return statistics.median(result.waits.values()) if result.waits else 0.0


HEADER = [
    "S",
    "policy",
    "throughput",
    "makespan",
    "bound",
    "vs bound",
    "p50 wait",
    "p95 wait",
    "max wait",
    "switches",
]


def result_row(cost: float, result: SimResult, bound: float) -> list[str]:
    return [
        f"{cost:g}",
        result.policy,
        f"{result.throughput:.3f}",
        f"{result.makespan:.0f}",
        f"{bound:.0f}",
        f"{result.makespan / bound:.3f}",
        f"{p50(result):.0f}",
        f"{result.p95_wait:.0f}",
        f"{result.max_wait:.0f}",
        str(result.switches),
    ]


def run_sim(
    args: argparse.Namespace,
) -> tuple[dict[float, tuple[SimResult, SimResult, float]], dict[float, SimResult]]:
    print(
        f"# burst: {args.tasks} tasks at t=0, {args.pods} pods, {args.models} models "
        f"Zipf({args.exponent}), inference {args.inference:g}, seed {args.seed}"
    )
    tasks = zipf_workload(
        n_tasks=args.tasks, n_models=args.models, exponent=args.exponent, seed=args.seed
    )
    out = {}
    rows = []
    for cost in args.switch_costs:
        common = {"pods": args.pods, "inference_time": args.inference, "switch_cost": cost}
        fifo = simulate(FifoPolicy(), tasks, **common)
        ours = simulate(affinity_for(args.inference, cost), tasks, **common)
        bound = lower_bound(tasks, args.pods, args.inference, cost)
        rows += [result_row(cost, fifo, bound), result_row(cost, ours, bound)]
        out[cost] = (fifo, ours, bound)
    print(table(rows, HEADER))

    rate = 0.8 * args.pods / args.inference
    print(
        f"\n# steady load: Poisson arrivals at {rate:g} tasks/unit (80% of capacity with no "
        "switches); the policy's max_wait setting shown per S (a task past it forces a switch; it still waits for a pod to free up and load)"
    )
    arriving = zipf_workload(
        n_tasks=args.tasks,
        n_models=args.models,
        exponent=args.exponent,
        seed=args.seed,
        arrival_rate=rate,
    )
    rows = []
    for cost in args.switch_costs:
        common = {"pods": args.pods, "inference_time": args.inference, "switch_cost": cost}
        fifo = simulate(FifoPolicy(), arriving, **common)
        ours = simulate(affinity_for(args.inference, cost), arriving, **common)
        bound = lower_bound(arriving, args.pods, args.inference, cost)
        limit = default_max_wait(args.inference, cost)
        rows += [
            result_row(cost, fifo, bound) + ["-"],
            result_row(cost, ours, bound) + [f"{limit:g}"],
        ]
    print(table(rows, [*HEADER, "max_wait setting"]))
    return out, run_windows(args, tasks, out)


WINDOWS = (64, 128, 256, 512, 1000)
#: The dispatcher's default window (SDEKS_WINDOW).
DEFAULT_WINDOW: int = DispatcherSettings.model_fields["window"].default


def run_windows(
    args: argparse.Namespace,
    tasks: list,
    unlimited: dict[float, tuple[SimResult, SimResult, float]],
) -> dict[float, SimResult]:
    """The burst with the policy limited to the dispatcher's window (FIFO is not affected)."""
    print(
        f"\n# burst, the policy seeing the oldest (window - {args.pods}) waiting tasks: the "
        f"dispatcher's window holds the running tasks too; default SDEKS_WINDOW = {DEFAULT_WINDOW}"
    )
    rows = []
    windowed: dict[float, SimResult] = {}
    for cost in args.switch_costs:
        fifo, ours, bound = unlimited[cost]
        common = {"pods": args.pods, "inference_time": args.inference, "switch_cost": cost}
        for window in (*WINDOWS, None):
            if window is None:
                result = ours
            else:
                view = max(1, window - args.pods)
                result = simulate(affinity_for(args.inference, cost), tasks, window=view, **common)
                if window == DEFAULT_WINDOW:
                    windowed[cost] = result
            label = (
                "all"
                if window is None
                else f"{window}" + (" (default)" * (window == DEFAULT_WINDOW))
            )
            rows.append(
                [
                    f"{cost:g}",
                    label,
                    f"{result.throughput:.3f}",
                    f"{result.throughput / fifo.throughput:.2f}",
                    f"{result.makespan / bound:.3f}",
                    str(result.switches),
                    f"{result.max_wait:.0f}",
                ]
            )
    print(table(rows, ["S", "window", "throughput", "vs fifo", "vs bound", "switches", "max wait"]))
    return windowed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 tasks (used by the tests)")
    parser.add_argument("--live", action="store_true", help="through the real dispatcher")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--exponent", type=float, default=1.1)
    parser.add_argument("--inference", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--switch-costs", type=lambda s: [float(x) for x in s.split(",")], default=[0, 2, 10, 30]
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = min(args.tasks, 200)
    if args.live:
        from benchmarks.scheduling_live import run_live

        return run_live(args)
    results, windowed = run_sim(args)
    headline = 10.0 if 10.0 in results else args.switch_costs[-1]
    fifo, ours, bound = results[headline]
    result = windowed[headline]
    print(
        f"\nwith the default window ({DEFAULT_WINDOW}) at S={headline:g}: affinity/fifo "
        f"{result.throughput / fifo.throughput:.2f}, makespan / lower bound "
        f"{result.makespan / bound:.3f}"
    )
    print(
        f"affinity makespan / lower bound at S={headline:g}: {ours.makespan / bound:.3f}; "
        f"max wait {ours.max_wait:.0f} vs fifo {fifo.max_wait:.0f}"
    )
    print(f"affinity/fifo throughput at S={headline:g}: {ours.throughput / fifo.throughput:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
