"""Dispatcher overhead: tasks/s through one real dispatcher against a plain SQS loop.

Both sides consume the same kind of queue on the same moto server process
(`benchmarks._common.MotoServer`), fed the same way: tasks published to the
task topic (SNS PublishBatch), which delivers them to the runtime queue as SNS
notifications, like real ones.

- ceiling: a plain boto3 loop in this process, ReceiveMessage (10, all
  attributes) then DeleteMessageBatch, one call at a time - the backend's pace.
- dispatcher: `python -m dispatcher` (its own process) with `--pods` instant
  pod doubles (another process) that answer every job at once with a
  succeeded callback and publish nothing.

Both are measured without the task table (the pure dispatch path: the
headline) and with it, as the local stack runs: the dispatcher then makes two
conditional DynamoDB writes per task (`admit`, `pin_seed`), so its ceiling is
the plain loop making the same two writes (`sdeks.tasks.TaskTable`) per message.

Throughput: `--tasks` published before the consumer starts; tasks/s over the
receipts after the first 10% (the warm-up: process start, first polls). A
receipt is the plain loop's ReceiveMessage returning, or a pod double getting
the job. Every configuration runs `--repeats` times, interleaved; the best run
counts (the machine may be shared). CPU time per task of each process over
the same window, and moto's API calls per task, say where the time goes.

By default moto runs alone on the first CPU and everything else (this
process, the dispatcher, the pod doubles) on the others, so the backend is
not slowed by the consumer it serves, as in a cluster; `--no-pin` lets the
OS place them (then the dispatcher's own CPU comes out of moto's share on a
2-core machine).

Latency: tasks published one at a time at `--rate` per second to an idle
consumer; per task, publish call start -> the plain loop's ReceiveMessage
returning (after its table writes, with the table), or -> the pod double
receiving the job. Both long-poll with the same wait (moto answers a long poll
as soon as a message lands).

    python benchmarks/dispatcher_overhead.py            # 2000 tasks x 3, ~5 min on 2 cores
    python benchmarks/dispatcher_overhead.py --quick    # 200 tasks x 1, ~30 s

The last line is the headline: `dispatcher/ceiling throughput: X.XX (N vs M tasks/s)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    RUNTIME,
    CpuSampler,
    DispatcherProcess,
    MotoServer,
    PodFleet,
    envelope,
    machine,
    percentile,
    pin,
    publish_all,
    queue_depth,
    runtime_attribute,
    table,
    wait_until,
    workdir,
)
from sdeks.envelope import parse_task, unwrap_sns
from sdeks.tasks import TaskTable

#: Long-poll wait of both consumers (the dispatcher's SDEKS_RECEIVE_WAIT_S).
WAIT_S = 1
#: Receipts before this fraction of a run are its warm-up and do not count.
WARMUP = 0.1

LABELS = {
    "plain": "plain receive+delete loop (ceiling)",
    "dispatcher": "dispatcher, no task table",
    "plain+table": "plain loop + the 2 table writes (ceiling)",
    "table": "dispatcher + task table (local stack)",
}
CEILING = {
    "plain": "plain",
    "dispatcher": "plain",
    "plain+table": "plain+table",
    "table": "plain+table",
}


def steady_window(times: list[float]) -> tuple[float, float, int]:
    """(start, end, receipts counted) of the receipts after the warm-up fraction."""
    times = sorted(times)
    first = int(len(times) * WARMUP)
    return times[first], times[-1], len(times) - 1 - first


def measured(
    times: list[float], sampler: CpuSampler, calls: dict[str, int], tasks: int
) -> dict[str, Any]:
    t0, t1, counted = steady_window(times)
    cpu = sampler.between(t0, t1)
    return {
        "tasks": tasks,
        "rate": counted / (t1 - t0) if t1 > t0 else float("inf"),
        "span": t1 - t0,
        "cpu_ms": {k: v * 1000 / counted for k, v in cpu.items()},
        "cores": sum(cpu.values()) / (t1 - t0) if t1 > t0 else 0.0,
        "calls": {k: v / tasks for k, v in calls.items()},
    }


def call_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


# --- the ceiling: a plain boto3 loop --------------------------------------------


def plain_loop(
    sqs: Any,
    url: str,
    count: int,
    *,
    stamps: dict[str, float] | None = None,
    table: Any = None,
) -> list[float]:
    """Receive + delete until `count` messages are done; receipt times (and ids into `stamps`).

    With `table` (a `sdeks.tasks.TaskTable`), each message also gets the two
    writes the dispatcher makes per task (`record_queued`, `remember_seed`).
    """
    loop = asyncio.new_event_loop() if table is not None else None
    times: list[float] = []
    while len(times) < count:
        answer = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=WAIT_S,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        now = time.time()
        messages = answer.get("Messages", [])
        if not messages:
            continue
        times += [now] * len(messages)
        for m in messages:
            if table is not None and loop is not None:
                note = unwrap_sns(m["Body"])
                task = parse_task(note.body, runtime=note.runtime)
                loop.run_until_complete(table.record_queued(task, published_at=note.published_at))
                loop.run_until_complete(table.remember_seed(task.id, random.randrange(2**32 - 2)))
            if stamps is not None:
                doc = json.loads(json.loads(m["Body"])["Message"])
                stamps[doc["task"]["metadata"]["id"]] = time.time()
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )
    if loop is not None:
        loop.close()
    return times


def run_plain(moto: MotoServer, fleet: PodFleet, tasks: int, *, task_table: bool) -> dict[str, Any]:
    stack = moto.new_stack()
    sqs = moto.client("sqs")
    publish_all(
        moto.client("sns"), stack.task_topic_arn, [envelope(f"p{i:05d}") for i in range(tasks)]
    )
    table = TaskTable(moto.client("dynamodb"), stack.task_table) if task_table else None
    url = stack.queues[RUNTIME]
    before = moto.calls()
    pids = {"moto": moto.pid, "consumer": os.getpid(), "pods": fleet.pid}
    with CpuSampler(pids) as sampler:
        times = plain_loop(sqs, url, tasks, table=table)
    calls = call_delta(before, moto.calls())
    if queue_depth(sqs, url):
        raise RuntimeError("plain loop left messages behind")
    return measured(times, sampler, calls, tasks)


# --- the dispatcher ----------------------------------------------------------------

#: Dispatcher settings of every run: the long poll of the plain loop; the rest defaults.
SETTINGS: dict[str, Any] = {"receive_wait_s": WAIT_S}
#: `--pin`: CPUs per role; moto alone on one, everything else on the rest.
PLACEMENT: dict[str, set[int]] = {}


def place(pid: int, role: str) -> None:
    if PLACEMENT:
        pin(pid, PLACEMENT[role])


def run_dispatcher(
    moto: MotoServer, fleet: PodFleet, work: Path, tasks: int, *, task_table: bool
) -> dict[str, Any]:
    stack = moto.new_stack()
    publish_all(
        moto.client("sns"), stack.task_topic_arn, [envelope(f"d{i:05d}") for i in range(tasks)]
    )
    fleet.reset()
    before = moto.calls()
    with DispatcherProcess(work, moto, stack, fleet.urls, task_table=task_table, **SETTINGS) as d:
        place(d.pid, "rest")
        pids = {"moto": moto.pid, "consumer": d.pid, "pods": fleet.pid}
        with CpuSampler(pids) as sampler:
            try:
                wait_until(
                    lambda: d.metric("sdeks_dispatcher_jobs_total", outcome="done") >= tasks,
                    timeout_s=60 + tasks / 10,
                    what=f"{tasks} tasks through the dispatcher",
                    interval_s=0.25,
                )
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{d.log_tail()}") from exc
    calls = call_delta(before, moto.calls())
    records = fleet.records()
    if len(records) != tasks:
        raise RuntimeError(f"pods saw {len(records)} jobs for {tasks} tasks")
    depth = queue_depth(moto.client("sqs"), stack.queues[RUNTIME])
    if depth:
        warnings = [line for line in d.log_tail(200_000).splitlines() if "WARN" in line]
        raise RuntimeError(
            f"the dispatcher left {depth} messages behind:\n" + "\n".join(warnings[-20:])
        )
    return measured([r["start"] for r in records], sampler, calls, tasks)


# --- latency ------------------------------------------------------------------------


def paced_publish(sns: Any, topic_arn: str, ids: list[str], rate: float) -> dict[str, float]:
    """Publish one task per 1/rate s; publish-call start time per id."""
    published: dict[str, float] = {}
    start = time.perf_counter()
    for i, task_id in enumerate(ids):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        published[task_id] = time.time()
        sns.publish(
            TopicArn=topic_arn,
            Message=json.dumps(envelope(task_id)),
            MessageAttributes=runtime_attribute(),
        )
    return published


def latency_plain(moto: MotoServer, count: int, rate: float, *, task_table: bool) -> list[float]:
    stack = moto.new_stack()
    sqs = moto.client("sqs")
    table = TaskTable(moto.client("dynamodb"), stack.task_table) if task_table else None
    received: dict[str, float] = {}
    consumer = threading.Thread(
        target=plain_loop,
        args=(sqs, stack.queues[RUNTIME], count),
        kwargs={"stamps": received, "table": table},
    )
    consumer.start()
    time.sleep(0.5)  # the first long poll is waiting
    ids = [f"lp{i:05d}" for i in range(count)]
    published = paced_publish(moto.client("sns"), stack.task_topic_arn, ids, rate)
    consumer.join(timeout=60)
    return [received[i] - published[i] for i in ids]


def latency_dispatcher(
    moto: MotoServer, fleet: PodFleet, work: Path, count: int, rate: float, *, task_table: bool
) -> list[float]:
    stack = moto.new_stack()
    fleet.reset()
    ids = [f"ld{i:05d}" for i in range(count)]
    with DispatcherProcess(work, moto, stack, fleet.urls, task_table=task_table, **SETTINGS) as d:
        place(d.pid, "rest")
        wait_until(
            lambda: d.metric("sdeks_dispatcher_pods") >= len(fleet.urls),
            timeout_s=30,
            what="pods polled by the dispatcher",
        )
        time.sleep(0.5)  # the first long poll is waiting
        published = paced_publish(moto.client("sns"), stack.task_topic_arn, ids, rate)
        wait_until(
            lambda: d.metric("sdeks_dispatcher_jobs_total", outcome="done") >= count,
            timeout_s=60,
            what="latency tasks through the dispatcher",
        )
    received = {r["id"]: r["start"] for r in fleet.records()}
    return [received[i] - published[i] for i in ids]


# --- report -------------------------------------------------------------------------

ORDER = ("plain", "dispatcher", "plain+table", "table")


def throughput_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    best = {k: max(v, key=lambda r: r["rate"]) for k, v in runs.items()}
    rows = []
    for k in ORDER:
        b = best[k]
        rows.append(
            [
                LABELS[k],
                b["tasks"],
                f"{b['span']:.2f}",
                f"{b['rate']:.0f}",
                " ".join(f"{r['rate']:.0f}" for r in runs[k]),
                f"{b['cores']:.2f}",
                f"{b['rate'] / best[CEILING[k]]['rate']:.2f}",
            ]
        )
    return table(rows, ["consumer", "tasks", "seconds", "tasks/s", "runs", "cores", "vs ceiling"])


def where_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    best = {k: max(v, key=lambda r: r["rate"]) for k, v in runs.items()}
    rows = []
    for k in ORDER:
        cpu, calls = best[k]["cpu_ms"], best[k]["calls"]
        other = sum(v for c, v in calls.items() if not c.startswith(("sqs.", "dynamodb.")))
        rows.append(
            [
                LABELS[k],
                f"{cpu['moto']:.2f}",
                f"{cpu['consumer']:.2f}",
                f"{cpu['pods']:.2f}",
                f"{sum(cpu.values()):.2f}",
                f"{calls.get('sqs.ReceiveMessage', 0):.2f}",
                f"{calls.get('sqs.DeleteMessageBatch', 0):.2f}",
                f"{sum(v for c, v in calls.items() if c.startswith('sqs.')):.2f}",
                f"{sum(v for c, v in calls.items() if c.startswith('dynamodb.')):.2f}",
                f"{other:.2f}",
            ]
        )
    header = ["consumer", "moto ms", "consumer ms", "pods ms", "total ms"]
    header += ["receives", "delete batches", "sqs calls", "dynamodb calls", "other calls"]
    return table(rows, header)


def latency_table(lat: dict[str, list[float]]) -> str:
    rows = []
    for k in ORDER:
        ref = lat[CEILING[k]]
        p50, p95 = percentile(lat[k], 50), percentile(lat[k], 95)
        rows.append(
            [
                LABELS[k].replace("(ceiling)", "(reference)"),
                len(lat[k]),
                f"{statistics.mean(lat[k]) * 1000:.1f}",
                f"{p50 * 1000:.1f}",
                f"{p95 * 1000:.1f}",
                f"{(p50 - percentile(ref, 50)) * 1000:+.1f}",
                f"{(p95 - percentile(ref, 95)) * 1000:+.1f}",
            ]
        )
    return table(rows, ["consumer", "tasks", "mean", "p50", "p95", "added p50", "added p95"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 tasks, 1 repeat (the tests)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2, help="job slots per pod double")
    parser.add_argument(
        "--table-tasks", type=int, help="tasks of the task-table runs (default: tasks / 4)"
    )
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="latency: tasks/s published")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the OS place the processes (default: moto alone on the first CPU)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.repeats, args.latency_tasks, args.rate = 200, 1, 10, 10.0
    table_tasks = args.table_tasks or max(10, args.tasks // 4)

    print(f"# machine: {machine()}")
    print(
        f"# {args.tasks} tasks ({table_tasks} with the task table) published via SNS -> SQS, "
        "then consumed; one moto server process; "
        f"the dispatcher with {args.pods} instant pod doubles x {args.slots} slots; "
        f"best of {args.repeats} runs"
    )
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ORDER}
    with workdir(keep=args.keep) as work:
        if args.keep:
            print(f"# logs in {work}")
        with (
            MotoServer(work) as moto,
            PodFleet(work, kind="instant", count=args.pods, slots=args.slots) as fleet,
        ):
            cpus = sorted(os.sched_getaffinity(0))
            if args.pin and len(cpus) >= 2:
                PLACEMENT.update(moto={cpus[0]}, rest=set(cpus[1:]))
                print(f"# pinned: moto on CPU {cpus[0]}, the rest on CPUs {cpus[1:]}")
                place(moto.pid, "moto")
                place(fleet.pid, "rest")
                place(os.getpid(), "rest")
            for _ in range(args.repeats):
                runs["plain"].append(run_plain(moto, fleet, args.tasks, task_table=False))
                runs["dispatcher"].append(
                    run_dispatcher(moto, fleet, work, args.tasks, task_table=False)
                )
                runs["plain+table"].append(run_plain(moto, fleet, table_tasks, task_table=True))
                runs["table"].append(
                    run_dispatcher(moto, fleet, work, table_tasks, task_table=True)
                )
            n, rate = args.latency_tasks, args.rate
            lat = {
                "plain": latency_plain(moto, n, rate, task_table=False),
                "dispatcher": latency_dispatcher(moto, fleet, work, n, rate, task_table=False),
                "plain+table": latency_plain(moto, n, rate, task_table=True),
                "table": latency_dispatcher(moto, fleet, work, n, rate, task_table=True),
            }
    print(
        f"\n# throughput: tasks/s over the receipts after the first {WARMUP:.0%}; "
        "cores = CPU seconds of moto + consumer + pods per second"
    )
    print(throughput_table(runs))
    print("\n# where the time goes, per task: CPU ms by process (same window) and moto API calls")
    print(where_table(runs))
    print(
        f"\n# latency at {rate:g} tasks/s, ms: publish -> the plain loop's receive (after its "
        "table writes) or -> the pod double's receipt"
    )
    print(latency_table(lat))

    best = {k: max(v, key=lambda r: r["rate"]) for k, v in runs.items()}
    d, c = best["dispatcher"]["rate"], best["plain"]["rate"]
    t, tc = best["table"]["rate"], best["plain+table"]["rate"]
    d50 = (percentile(lat["dispatcher"], 50) - percentile(lat["plain"], 50)) * 1000
    d95 = (percentile(lat["dispatcher"], 95) - percentile(lat["plain"], 95)) * 1000
    print(
        f"\nwith the task table: {t / tc:.2f} of its ceiling ({t:.0f} vs {tc:.0f} tasks/s); "
        f"added latency without it: p50 {d50:+.1f} ms, p95 {d95:+.1f} ms"
    )
    print(f"dispatcher/ceiling throughput: {d / c:.2f} ({d:.0f} vs {c:.0f} tasks/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
