"""Scheduling: the real affinity policy against FIFO and holder-first, simulated pods, virtual time.

FIFO is the reference design's behaviour: each free pod takes the oldest task
and switches model if it must. Holder-first is Ray Serve's model-multiplexing
rule: a free pod takes the oldest task of a model it holds, otherwise the
oldest task. Ours is `dispatcher.scheduler.AffinityPolicy`, the same object
the dispatcher runs, driven here by the deterministic discrete-event
simulator `dispatcher.simulator`.

Workload (defaults = the headline's): 4 pods, 8 models with Zipf(1.1)
popularity, 2000 tasks, inference time 1, switch cost S in {0, 2, 10, 30}.
Part 1 is a burst (every task queued at t=0: throughput and makespan); part 2
is Poisson arrivals at 80% of the pods' capacity (the wait bound under load);
part 3 is the burst again with the policy seeing only what the dispatcher's
window holds (`SDEKS_WINDOW` messages, running tasks included). Part 4 is
the fleet table at S=10: 4/8, 16/32 and 64/128 pods/models, Zipf 0.9, 1.1
and 1.3, burst and Poisson at 80%, 1, 2 and 4 dispatcher replicas, each with
the default window for its fleet (`DispatcherSettings.window_for`). Part 5 is
the policy's CPU time per decision at 64 pods.

    python benchmarks/scheduling.py            # full run, several minutes on 2 cores
    python benchmarks/scheduling.py --quick    # small sizes, a few seconds
    python benchmarks/scheduling.py --live     # the real dispatcher, moto, sleeping pods

The last line is the headline: `affinity/fifo throughput at S=10: X.XX`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import table
from dispatcher.scheduler import Backlog, FifoPolicy, HolderFirstPolicy, PendingTask, PodView
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
        holder = simulate(HolderFirstPolicy(), tasks, **common)
        ours = simulate(affinity_for(args.inference, cost), tasks, **common)
        bound = lower_bound(tasks, args.pods, args.inference, cost)
        rows += [result_row(cost, r, bound) for r in (fifo, holder, ours)]
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
        holder = simulate(HolderFirstPolicy(), arriving, **common)
        ours = simulate(affinity_for(args.inference, cost), arriving, **common)
        bound = lower_bound(arriving, args.pods, args.inference, cost)
        limit = default_max_wait(args.inference, cost)
        rows += [
            result_row(cost, fifo, bound) + ["-"],
            result_row(cost, holder, bound) + ["-"],
            result_row(cost, ours, bound) + [f"{limit:g}"],
        ]
    print(table(rows, [*HEADER, "max_wait setting"]))
    return out, run_windows(args, tasks, out)


WINDOWS = (64, 128, 256, 512, 1000)
_DEFAULTS = DispatcherSettings.model_construct(
    **{k: f.default for k, f in DispatcherSettings.model_fields.items() if not f.is_required()}
)


def default_window(pods: int) -> int:
    """The dispatcher's window for a fleet of `pods` with default settings (`window_for`)."""
    return _DEFAULTS.window_for(pods)


#: The default window of the headline's 4 pods.
DEFAULT_WINDOW: int = default_window(4)


def run_windows(
    args: argparse.Namespace,
    tasks: list,
    unlimited: dict[float, tuple[SimResult, SimResult, float]],
) -> dict[float, SimResult]:
    """The burst with the policy limited to the dispatcher's window (FIFO is not affected)."""
    default = default_window(args.pods)
    print(
        f"\n# burst, the policy seeing what the dispatcher's window holds, the running tasks "
        f"included; the default window for {args.pods} pods is {default}"
    )
    rows = []
    windowed: dict[float, SimResult] = {}
    for cost in args.switch_costs:
        fifo, ours, bound = unlimited[cost]
        common = {"pods": args.pods, "inference_time": args.inference, "switch_cost": cost}
        for window in (*sorted({*WINDOWS, default}), None):
            if window is None:
                result = ours
            else:
                result = simulate(
                    affinity_for(args.inference, cost), tasks, window=window, **common
                )
                if window == default:
                    windowed[cost] = result
            label = "all" if window is None else f"{window}" + (" (default)" * (window == default))
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


#: Fleet sizes: pods, models, tasks.
FLEET_SIZES = ((4, 8, 2000), (16, 32, 8000), (64, 128, 16000))
FLEET_EXPONENTS = (0.9, 1.1, 1.3)
FLEET_REPLICAS = (1, 2, 4)
#: --quick: small and few, so the test run stays short.
QUICK_FLEET_SIZES = ((4, 8, 200), (16, 32, 800))
QUICK_FLEET_EXPONENTS = (1.1,)
QUICK_FLEET_REPLICAS = (1, 2)
FLEET_COST = 10.0
#: The others' demand a replica plans with is one state poll old: the default poll
#: (2 s) over a typical inference (5 s), in inference units.
FLEET_VIEW_INTERVAL = 0.4
#: --held-out: the same family, other seeds, exponents, sizes and replica counts
#: (pods, models, tasks, zipf, arrivals, replicas, seed); not used to tune anything.
HELD_OUT = (
    (16, 32, 8000, 1.1, "burst", 2, 1),
    (16, 32, 8000, 1.3, "burst", 4, 2),
    (16, 32, 8000, 1.0, "poisson 80%", 3, 0),
    (32, 64, 12000, 1.2, "burst", 3, 0),
    (32, 64, 12000, 1.0, "burst", 2, 3),
    (32, 64, 12000, 1.2, "poisson 80%", 4, 1),
    (64, 128, 16000, 1.0, "burst", 3, 4),
    (64, 128, 16000, 1.2, "burst", 4, 5),
    (4, 8, 2000, 1.2, "burst", 3, 6),
    (4, 8, 2000, 1.0, "poisson 80%", 2, 7),
)

FLEET_HEADER = [
    "pods/models/tasks",
    "zipf",
    "arrivals",
    "replicas",
    "window",
    "fifo",
    "holder-first",
    "affinity",
    "aff own view",
    "aff/hf tput",
    "aff max wait",
    "hf max wait",
    "aff switches",
    "plan ms",
]


def fleet_row(
    pods: int,
    models: int,
    n: int,
    exponent: float,
    arrivals: str,
    replicas: int,
    seed: int,
    inference: float,
    own_view: bool = True,
) -> tuple[list[str], float, float]:
    """One fleet configuration: the cells, affinity's makespan / bound, and its
    throughput over holder-first's. `own_view`: also run affinity without the
    shared view (each replica on its own share only)."""
    cost = FLEET_COST
    rate = 0.8 * pods / inference if arrivals != "burst" else None
    tasks = zipf_workload(
        n_tasks=n, n_models=models, exponent=exponent, seed=seed, arrival_rate=rate
    )
    bound = lower_bound(tasks, pods, inference, cost)
    window = default_window(pods)
    common = {
        "pods": pods,
        "inference_time": inference,
        "switch_cost": cost,
        "window": window,
        "replicas": replicas,
    }
    fifo = simulate(FifoPolicy(), tasks, **common)  # type: ignore[arg-type]
    holder = simulate(HolderFirstPolicy(), tasks, **common)  # type: ignore[arg-type]
    ours = simulate(
        affinity_for(inference, cost),
        tasks,
        view_interval=FLEET_VIEW_INTERVAL,
        **common,  # type: ignore[arg-type]
    )
    alone = "-"
    if own_view and replicas > 1:
        solo = simulate(affinity_for(inference, cost), tasks, shared_view=False, **common)  # type: ignore[arg-type]
        alone = f"{solo.makespan / bound:.3f}"
    elif replicas == 1:
        alone = "="
    cells = [
        f"{pods}/{models}/{n}",
        f"{exponent:g}",
        arrivals,
        str(replicas),
        str(window),
        f"{fifo.makespan / bound:.3f}",
        f"{holder.makespan / bound:.3f}",
        f"{ours.makespan / bound:.3f}",
        alone,
        f"{ours.throughput / holder.throughput:.2f}",
        f"{ours.max_wait:.0f}",
        f"{holder.max_wait:.0f}",
        str(ours.switches),
        f"{1e3 * ours.plan_seconds / max(1, ours.plan_calls):.2f}",
    ]
    return cells, ours.makespan / bound, ours.throughput / holder.throughput


def run_fleet(args: argparse.Namespace) -> tuple[float, float]:
    """Part 4: makespan / lower bound of each policy; returns (worst affinity ratio to the
    bound, lowest affinity/holder-first throughput)."""
    sizes = QUICK_FLEET_SIZES if args.quick else FLEET_SIZES
    exponents = QUICK_FLEET_EXPONENTS if args.quick else FLEET_EXPONENTS
    replicas_list = QUICK_FLEET_REPLICAS if args.quick else FLEET_REPLICAS
    print(
        f"\n# fleet: S={FLEET_COST:g}, inference {args.inference:g}, seed {args.seed}; makespan / "
        "lower bound per policy; each replica holds the default window for the fleet (running "
        "tasks included) of a disjoint share of the queue and plans onto the same pods; "
        "affinity: with the shared view (the other replicas' waiting tasks per model, one "
        f"poll = {FLEET_VIEW_INTERVAL:g} units old); aff own view: without it (= : one "
        "replica); max wait in units; plan ms: CPU per plan() call"
    )
    rows = []
    worst, weakest = 0.0, float("inf")
    began = time.process_time()
    for (pods, models, n), exponent, arrivals in (
        (size, e, a) for size in sizes for e in exponents for a in ("burst", "poisson 80%")
    ):
        for replicas in replicas_list:
            cells, ratio, tput = fleet_row(
                pods, models, n, exponent, arrivals, replicas, args.seed, args.inference
            )
            worst, weakest = max(worst, ratio), min(weakest, tput)
            rows.append(cells)
            if args.progress:
                print("  ".join(cells), flush=True)
    print(table(rows, FLEET_HEADER))
    print(f"# part 4 took {time.process_time() - began:.0f} s of CPU")
    return worst, weakest


def run_held_out(args: argparse.Namespace) -> tuple[float, float]:
    """Configurations of the same family not in the fleet table (`HELD_OUT`)."""
    print(
        "\n# held out: other seeds, exponents, sizes and replica counts; default settings, "
        "the shared view one poll old"
    )
    rows = []
    worst, weakest = 0.0, float("inf")
    for pods, models, n, exponent, arrivals, replicas, seed in HELD_OUT:
        cells, ratio, tput = fleet_row(
            pods, models, n, exponent, arrivals, replicas, seed, args.inference
        )
        worst, weakest = max(worst, ratio), min(weakest, tput)
        rows.append([f"{seed}", *cells])
        if args.progress:
            print("  ".join(rows[-1]), flush=True)
    print(table(rows, ["seed", *FLEET_HEADER]))
    return worst, weakest


CPU_WINDOWS = (512, 2048, 8192)
CPU_PODS = 64
CPU_MODELS = 128


def run_cpu(args: argparse.Namespace) -> None:
    """Part 5: CPU time of one `plan()` at 64 pods against the window (tasks in view).

    A snapshot mid-run: the window full of Zipf(1.1) tasks over 128 models, every
    pod on some model, a quarter of them free. `kept` is the dispatcher's case
    (the backlog grouped as tasks come and go); `list` groups a plain list first.
    """
    print(
        f"\n# CPU per decision: {CPU_PODS} pods ({CPU_PODS // 4} free), {CPU_MODELS} models, "
        "the window full; us per (window x pods) must not grow with the window"
    )
    rows = []
    rng = random.Random(args.seed)
    policy = affinity_for(args.inference, FLEET_COST)
    for window in CPU_WINDOWS[:2] if args.quick else CPU_WINDOWS:
        tasks = [
            PendingTask(t.key, t.model, t.arrival)
            for t in zipf_workload(
                n_tasks=window, n_models=CPU_MODELS, exponent=1.1, seed=args.seed, arrival_rate=10
            )
        ]
        pods = [
            PodView(f"pod-{i}", int(i % 4 == 0), f"model-{rng.randint(1, CPU_MODELS)}")
            for i in range(CPU_PODS)
        ]
        backlog = Backlog(tasks)
        now = tasks[-1].enqueued_at
        out = []
        for view in (backlog, tasks):
            reps = 20 if args.quick else 50
            began = time.process_time()
            for _ in range(reps):
                policy.plan(now, view, pods)
            out.append((time.process_time() - began) / reps)
        rows.append(
            [
                str(window),
                f"{out[0] * 1e3:.2f}",
                f"{out[1] * 1e3:.2f}",
                f"{out[0] * 1e6 / (window * CPU_PODS):.4f}",
                f"{out[1] * 1e6 / (window * CPU_PODS):.4f}",
            ]
        )
    print(table(rows, ["window", "kept ms", "list ms", "kept us/(w x p)", "list us/(w x p)"]))


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
    parser.add_argument("--progress", action="store_true", help="print fleet rows as they come")
    parser.add_argument("--fleet-only", action="store_true", help="parts 4 and 5 only")
    parser.add_argument(
        "--held-out", action="store_true", help="only the held-out fleet configurations"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = min(args.tasks, 200)
    if args.live:
        from benchmarks.scheduling_live import run_live

        return run_live(args)
    if args.held_out:
        worst, weakest = run_held_out(args)
        print(
            f"\nheld out: affinity makespan / lower bound at most {worst:.3f}; "
            f"affinity/holder-first throughput at least {weakest:.2f}"
        )
        return 0
    if args.fleet_only:
        worst, weakest = run_fleet(args)
        run_cpu(args)
        print(
            f"\nfleet: affinity makespan / lower bound at most {worst:.3f}; "
            f"affinity/holder-first throughput at least {weakest:.2f}"
        )
        return 0
    results, windowed = run_sim(args)
    worst, weakest = run_fleet(args)
    run_cpu(args)
    headline = 10.0 if 10.0 in results else args.switch_costs[-1]
    fifo, ours, bound = results[headline]
    result = windowed[headline]
    print(
        f"\nwith the default window ({DEFAULT_WINDOW}) at S={headline:g}: affinity/fifo "
        f"{result.throughput / fifo.throughput:.2f}, makespan / lower bound "
        f"{result.makespan / bound:.3f}"
    )
    print(
        f"fleet: affinity makespan / lower bound at most {worst:.3f}; "
        f"affinity/holder-first throughput at least {weakest:.2f}"
    )
    print(
        f"affinity makespan / lower bound at S={headline:g}: {ours.makespan / bound:.3f}; "
        f"max wait {ours.max_wait:.0f} vs fifo {fifo.max_wait:.0f}"
    )
    print(f"affinity/fifo throughput at S={headline:g}: {ours.throughput / fifo.throughput:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
