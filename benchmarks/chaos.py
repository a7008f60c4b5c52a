"""Chaos: SIGKILL runtime pods and dispatchers under load; nothing is lost or duplicated.

The embedded stack (moto server, two runtime pods and two dispatchers, each a
separate process, four models served by the tiny CPU model) receives
`--tasks` tasks (64x64, 2 steps, batch sizes 1-3, n_iter 1-2, one in six an
image-to-image from an `s3://` link), published at a steady pace while a
monkey SIGKILLs a random pod or dispatcher every `--interval` seconds and
restarts it on the same port, as Kubernetes would. The queues' visibility
timeout is short (10 s) so a killed dispatcher's messages come back quickly;
the dispatchers' heartbeat extends held messages by that much every 3 s.

A listener subscribed to the callback topic before the first publish counts
terminal callbacks per task id, and keeps listening for a grace period after
the last expected one to catch late duplicates. Then every succeeded task's
outputs are checked in S3: exactly `{id}-1.png .. {id}-N.png` (N = batch_size
x n_iter, each a 64x64 PNG) and `{id}.json`, nothing more.

    python benchmarks/chaos.py             # 200 tasks, 12 kills (~3 min on 2 cores)
    python benchmarks/chaos.py --quick     # 30 tasks, 4 kills

    lost        tasks without a terminal callback when the run ended
    duplicates  terminal callbacks beyond the first, summed over task ids
    incomplete  succeeded tasks whose outputs in S3 are missing or extra

The last line is the headline, e.g.
`tasks=200 kills=12 succeeded=200 failed=0 lost=0 duplicates=0`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import queue_depth
from sdeks.callback import Callback, Manifest
from sdeks.client import CallbackListener, SdeksClient
from sdeks.envelope import Task, TaskType
from sdeks.local import DEFAULT_MODEL, LocalStack, Service

log = logging.getLogger("chaos")

MODELS = [DEFAULT_MODEL, "chaos-b", "chaos-c", "chaos-d"]
PREFIX = "chaos"
SIZE = 64
#: Visibility timeout of the stack's queues and the dispatchers' lease extension.
VISIBILITY_S = 10
DISPATCHER_ENV = {
    "SDEKS_LEASE_EXTENSION_S": str(VISIBILITY_S),
    "SDEKS_HEARTBEAT_INTERVAL_S": "3",
    # Short polls: a restarted dispatcher (and `stop`) is not stuck in a 10 s long poll.
    "SDEKS_RECEIVE_WAIT_S": "2",
    "SDEKS_STATE_INTERVAL_S": "0.5",
    "SDEKS_RETRY_BACKOFF_S": "1",
    "SDEKS_GRACE_PERIOD_S": "5",
}
#: Two pods on two cores: one torch thread each.
POD_ENV = {"SDEKS_TORCH_THREADS": "1"}


@dataclass(frozen=True)
class ChaosConfig:
    tasks: int = 200
    kills: int = 12
    #: Seconds between one restart completing and the next kill.
    interval_s: float = 5.0
    seed: int = 1
    #: Keep listening this long after the last expected callback (late duplicates).
    grace_s: float = 2 * VISIBILITY_S
    #: Give up waiting for callbacks this long after the last publish.
    timeout_s: float = 600.0
    #: A built tiny model folder to serve (skips building one).
    models_dir: Path | None = None
    workdir: Path | None = None


@dataclass(frozen=True)
class PlannedTask:
    id: str
    model: str
    batch_size: int
    n_iter: int
    image_to_image: bool

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter


@dataclass
class Kill:
    at_s: float
    service: str
    kind: str  # "pod" | "dispatcher"
    restart_s: float


@dataclass
class Arrival:
    at_s: float
    callback: Callback


@dataclass
class ChaosReport:
    config: ChaosConfig
    planned: dict[str, PlannedTask]
    kills: list[Kill]
    arrivals: dict[str, list[Arrival]]
    #: Callbacks for ids that were never published (must stay empty).
    strangers: list[Callback]
    #: Succeeded task id -> what is wrong with its outputs.
    incomplete: dict[str, str]
    #: Retries the dispatchers logged, by kind (`count_retries`).
    retries: dict[str, int]
    dlq_depth: int
    duration_s: float
    diagnosis: list[str] = field(default_factory=list)

    def first(self, task_id: str) -> Callback | None:
        got = self.arrivals.get(task_id)
        return got[0].callback if got else None

    @property
    def succeeded(self) -> int:
        return sum(1 for i in self.planned if (c := self.first(i)) and c.status == "succeeded")

    @property
    def failed(self) -> int:
        return sum(1 for i in self.planned if (c := self.first(i)) and c.status != "succeeded")

    @property
    def lost(self) -> list[str]:
        return sorted(i for i in self.planned if not self.arrivals.get(i))

    @property
    def duplicated(self) -> dict[str, int]:
        return {i: len(a) for i, a in sorted(self.arrivals.items()) if len(a) > 1}

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.duplicated.values())

    def line(self) -> str:
        return (
            f"tasks={len(self.planned)} kills={len(self.kills)} succeeded={self.succeeded} "
            f"failed={self.failed} lost={len(self.lost)} duplicates={self.duplicates}"
        )

    def table(self) -> str:
        kinds = Counter(k.kind for k in self.kills)
        statuses = Counter(a.callback.status.value for arr in self.arrivals.values() for a in arr)
        codes = Counter(
            c.error.code
            for i in self.planned
            if (c := self.first(i)) is not None and c.error is not None
        )
        restarts = [k.restart_s for k in self.kills]
        rows = [
            (
                "tasks",
                f"{len(self.planned)} over {len(MODELS)} models, "
                f"{sum(t.images for t in self.planned.values())} images",
            ),
            ("kills", ", ".join(f"{kind}={n}" for kind, n in sorted(kinds.items())) or "0"),
            (
                "restart",
                f"mean {sum(restarts) / len(restarts):.1f} s, max {max(restarts):.1f} s"
                if restarts
                else "-",
            ),
            ("time", f"{self.duration_s:.0f} s"),
            ("callbacks", ", ".join(f"{s}={n}" for s, n in sorted(statuses.items())) or "0"),
            ("failure codes", ", ".join(f"{c}={n}" for c, n in sorted(codes.items())) or "-"),
            (
                "retries",
                ", ".join(f"{kind}={n}" for kind, n in self.retries.items()),
            ),
            ("incomplete outputs", str(len(self.incomplete))),
            ("unknown ids", str(len(self.strangers))),
            ("DLQ messages", str(self.dlq_depth)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- the workload ----------------------------------------------------------------


def plan_tasks(count: int, seed: int) -> list[PlannedTask]:
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:6]
    return [
        PlannedTask(
            id=f"chaos-{run}-{n:04d}",
            model=MODELS[n % len(MODELS)],
            batch_size=rng.choice([1, 1, 2, 3]),
            n_iter=rng.choice([1, 1, 2]),
            image_to_image=rng.random() < 1 / 6,
        )
        for n in range(count)
    ]


def envelope(task: PlannedTask, init_image_url: str) -> dict[str, Any]:
    content: dict[str, Any] = {
        "prompt": f"a chaos monkey, {task.model}",
        "steps": 2,
        "width": SIZE,
        "height": SIZE,
        "seed": 1000 + int(task.id.rsplit("-", 1)[1]),
        "batch_size": task.batch_size,
        "n_iter": task.n_iter,
        "alwayson_scripts": {"sd_model_checkpoint": task.model},
    }
    if task.image_to_image:
        content["init_images"] = [init_image_url]
        content["denoising_strength"] = 0.6
    return Task(
        id=task.id,
        runtime="sdruntime",
        tasktype=TaskType.IMAGE_TO_IMAGE if task.image_to_image else TaskType.TEXT_TO_IMAGE,
        prefix=PREFIX,
        context={"chaos": task.id},
        content=content,
    ).to_envelope()


def png(color: tuple[int, int, int] = (40, 90, 200)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the moving parts --------------------------------------------------------------


class Collector(threading.Thread):
    """Drains the callback listener into per-id arrival lists until stopped."""

    def __init__(self, listener: CallbackListener, started: float, wanted: set[str]) -> None:
        super().__init__(name="collector", daemon=True)
        self.listener, self.started, self.wanted = listener, started, wanted
        self.arrivals: dict[str, list[Arrival]] = {}
        self.strangers: list[Callback] = []
        self.last_terminal_at = started
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                callbacks = self.listener.poll(wait_s=1)
            except Exception:  # moto restarts nothing; a poll error is transient
                log.warning("callback poll failed", exc_info=True)
                continue
            now = time.monotonic() - self.started
            with self.lock:
                for callback in callbacks:
                    if not callback.status.terminal:
                        continue
                    if callback.id not in self.wanted:
                        self.strangers.append(callback)
                        continue
                    self.arrivals.setdefault(str(callback.id), []).append(Arrival(now, callback))
                    self.last_terminal_at = time.monotonic()

    def done(self) -> int:
        with self.lock:
            return len(self.arrivals)


class Monkey(threading.Thread):
    """SIGKILLs a random pod or dispatcher every `interval_s`, then restarts it."""

    def __init__(
        self, stack: LocalStack, kills: int, interval_s: float, seed: int, started: float
    ) -> None:
        super().__init__(name="monkey", daemon=True)
        self.stack, self.target, self.interval_s = stack, kills, interval_s
        self.rng = random.Random(seed)
        self.started = started
        self.kills: list[Kill] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _kinds(self) -> list[str]:
        # The first two kills hit one of each kind, so even a short run covers both.
        first = ["pod", "dispatcher"]
        self.rng.shuffle(first)
        rest = [self.rng.choice(["pod", "dispatcher"]) for _ in range(max(0, self.target - 2))]
        return (first + rest)[: self.target]

    def run(self) -> None:
        try:
            for kind in self._kinds():
                if self.stop.wait(self.interval_s):
                    return
                services: list[Service] = (
                    self.stack.pods["sdruntime"]
                    if kind == "pod"
                    else self.stack.dispatcher_services
                )
                victim = self.rng.choice([s for s in services if s.proc.poll() is None])
                at = time.monotonic() - self.started
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                begin = time.monotonic()
                self.stack.restart(victim)
                kill = Kill(at, victim.name, kind, time.monotonic() - begin)
                self.kills.append(kill)
                log.info("killed %s at %.1f s, back in %.1f s", victim.name, at, kill.restart_s)
        except BaseException as exc:  # reported by the main thread
            self.error = exc


# --- the run -------------------------------------------------------------------


def start_stack(config: ChaosConfig, workdir: Path) -> LocalStack:
    stack = LocalStack(
        workdir=workdir,
        pods_per_runtime=2,
        dispatchers=2,
        models_dir=config.models_dir,
        model_aliases=MODELS[1:],
        visibility_timeout_s=VISIBILITY_S,
        extra_env=dict(POD_ENV),
        dispatcher_env_extra=dict(DISPATCHER_ENV),
    )
    return stack.start()


def run_chaos(config: ChaosConfig, *, say: Callable[[str], None] = print) -> ChaosReport:
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="sdeks-chaos-"))
    say(f"starting the stack in {workdir} (2 pods, 2 dispatchers, {len(MODELS)} models)")
    stack = start_stack(config, workdir)
    try:
        return _run(stack, config, say)
    finally:
        stack.stop()


def _run(stack: LocalStack, config: ChaosConfig, say: Callable[[str], None]) -> ChaosReport:
    assert stack.resources
    resources = stack.resources
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.input_bucket, Key="chaos/in.png", Body=png())
    init_url = f"s3://{stack.input_bucket}/chaos/in.png"
    planned = {t.id: t for t in plan_tasks(config.tasks, config.seed)}
    sqs = stack.client("sqs")
    client = SdeksClient(
        sns=stack.client("sns"),
        sqs=sqs,
        s3=s3,
        task_topic_arn=resources.task_topic_arn,
        callback_topic_arn=resources.callback_topic_arn,
    )
    # Unfiltered: the stack is ours alone, and a strange id is worth seeing.
    with client.listen() as listener:
        started = time.monotonic()
        collector = Collector(listener, started, set(planned))
        collector.start()
        monkey = Monkey(stack, config.kills, config.interval_s, config.seed, started)
        monkey.start()
        # Publish at a pace that spreads the load over the whole kill period.
        span = 0.7 * config.kills * (config.interval_s + 4.0)  # restarts: 1-10 s
        pause = span / max(1, len(planned))
        publisher = SdeksClient(
            sns=stack.client("sns"),
            task_topic_arn=resources.task_topic_arn,
            callback_topic_arn=resources.callback_topic_arn,
        )
        say(f"publishing {len(planned)} tasks over ~{span:.0f} s, {config.kills} kills")
        for task in planned.values():
            publisher.publish(envelope(task, init_url), runtime="sdruntime")
            time.sleep(pause)
        published_at = time.monotonic()

        # Wait for the monkey, then for one terminal callback per task (or the timeout),
        # then listen on for the grace period to catch late duplicates.
        while monkey.is_alive() and monkey.error is None:
            monkey.join(timeout=1)
        if monkey.error is not None:
            raise RuntimeError(f"the monkey failed: {monkey.error}") from monkey.error
        task_queues = [resources.queues["sdruntime"], resources.catch_all_queue_url]
        while collector.done() < len(planned):
            if time.monotonic() - published_at > config.timeout_s:
                say(f"timed out with {len(planned) - collector.done()} tasks unanswered")
                break
            # Nothing held, nothing queued (`queue_depth` counts delayed and in-flight
            # messages) and no callback for a while: what has not ended by now never will.
            quiet = time.monotonic() - collector.last_terminal_at > 2 * VISIBILITY_S + 10
            if quiet and sum(queue_depth(sqs, q) for q in task_queues) == 0:
                say(f"queues empty, {len(planned) - collector.done()} tasks unanswered")
                break
            time.sleep(1)
        quiet_until = time.monotonic() + config.grace_s
        while time.monotonic() < quiet_until:
            time.sleep(0.5)
            quiet_until = max(quiet_until, collector.last_terminal_at + config.grace_s)
        collector.stop.set()
        collector.join(timeout=10)
        duration = time.monotonic() - started

    report = ChaosReport(
        config=config,
        planned=planned,
        kills=monkey.kills,
        arrivals=collector.arrivals,
        strangers=collector.strangers,
        incomplete={},
        retries=count_retries(stack),
        dlq_depth=queue_depth(sqs, resources.dlqs["sdruntime"])
        + queue_depth(sqs, resources.catch_all_dlq_url),
        duration_s=duration,
    )
    report.incomplete = check_outputs(stack, report)
    report.diagnosis = diagnose(stack, report)
    return report


# --- checks ----------------------------------------------------------------------


def check_outputs(stack: LocalStack, report: ChaosReport) -> dict[str, str]:
    """Succeeded task id -> what is wrong with its S3 outputs (absent when all is well)."""
    from PIL import Image

    from sdeks.aws import parse_s3_url

    assert stack.resources
    s3 = stack.client("s3")
    bucket = stack.resources.output_bucket
    problems: dict[str, str] = {}
    for task_id, task in report.planned.items():
        callback = report.first(task_id)
        if callback is None or callback.status != "succeeded":
            continue
        folder = f"{PREFIX}/{task_id}/"
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=folder).get("Contents", [])
        keys = {o["Key"] for o in listed}
        pngs = [f"{folder}{task_id}-{n}.png" for n in range(1, task.images + 1)]
        wanted = {*pngs, f"{folder}{task_id}.json"}
        if keys != wanted:
            problems[task_id] = f"missing {sorted(wanted - keys)} extra {sorted(keys - wanted)}"
            continue
        if callback.image_url != [f"s3://{bucket}/{k}" for k in pngs]:
            problems[task_id] = f"callback image_url {callback.image_url}"
            continue
        manifest = Manifest.model_validate_json(
            s3.get_object(Bucket=bucket, Key=f"{folder}{task_id}.json")["Body"].read()
        )
        if manifest.status != "succeeded" or len(manifest.images) != task.images:
            problems[task_id] = f"manifest {manifest.status} with {len(manifest.images)} images"
            continue
        for url in callback.image_url:
            _, key = parse_s3_url(url)
            with Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as im:
                if im.size != (SIZE, SIZE):
                    problems[task_id] = f"{key} is {im.size}"
    return problems


#: Dispatcher log lines that show a retry (dispatcher/service.py, dispatcher/routing.py).
_RETRY_LINES = {
    # a job that failed on one pod and was tried on another within the same receive
    "pod retries": re.compile(r"attempt \d+/\d+ failed"),
    # a task that ended on a later receive than its first (its lease lapsed or was released)
    "later receives": re.compile(r"task \S+ \w+ \(attempt ([2-9]|\d\d+)\)"),
    # a message received again after its task had ended: dropped, not rendered again
    "dropped as ended": re.compile(r"already ended; message dropped"),
}


def count_retries(stack: LocalStack) -> dict[str, int]:
    """Retries seen, counted from the dispatchers' logs (killed ones included)."""
    counts = dict.fromkeys(_RETRY_LINES, 0)
    for path in sorted((stack.workdir / "logs").glob("dispatcher-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            for kind, pattern in _RETRY_LINES.items():
                if pattern.search(line):
                    counts[kind] += 1
    return counts


def diagnose(stack: LocalStack, report: ChaosReport) -> list[str]:
    """For every lost, duplicated or incomplete task: its table record, the kills
    around it and the service log lines that name it."""
    assert stack.resources
    suspects = {
        **{i: "lost" for i in report.lost},
        **{i: f"{n} terminal callbacks" for i, n in report.duplicated.items()},
        **{i: f"incomplete outputs: {why}" for i, why in report.incomplete.items()},
    }
    lines = [f"unknown callback id {c.id}: {c.status.value}" for c in report.strangers]
    failures: dict[str, list[tuple[str, str]]] = {}
    for task_id in sorted(report.planned):
        callback = report.first(task_id)
        if callback is not None and callback.error is not None:
            failures.setdefault(callback.error.code, []).append((task_id, callback.error.message))
    for code, failed in sorted(failures.items()):
        lines.append(f"failed with {code}: {len(failed)} tasks, e.g.")
        lines += [f"  {task_id}: {message[:160]}" for task_id, message in failed[:3]]
    if not suspects:
        return lines
    dynamodb = stack.client("dynamodb")
    logs = sorted((stack.workdir / "logs").glob("*.log"))
    kills = ", ".join(f"{k.service}@{k.at_s:.1f}s" for k in report.kills)
    lines.append(f"kills: {kills}")
    for task_id, what in sorted(suspects.items()):
        lines.append(f"--- {task_id}: {what}")
        for arrival in report.arrivals.get(task_id, []):
            c = arrival.callback
            code = c.error.code if c.error else "-"
            lines.append(f"  callback at {arrival.at_s:.1f}s: {c.status.value} {code}")
        item = dynamodb.get_item(
            TableName=stack.resources.task_table, Key={"id": {"S": task_id}}, ConsistentRead=True
        ).get("Item", {})
        fields = ("status", "attempts", "pod", "callback_published", "cancel_requested")
        record = {k: next(iter(item[k].values())) for k in fields if k in item}
        lines.append(f"  table: {json.dumps(record)}")
        for path in logs:
            for text in path.read_text(errors="replace").splitlines():
                if task_id in text:
                    lines.append(f"  {path.stem}: {text[:220]}")
    return lines


# --- entry point ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="30 tasks, 4 kills, 3 s apart")
    parser.add_argument("--workdir", type=Path, help="keep the stack's logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.kills, args.interval = 30, 4, 3.0

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("chaos").setLevel(logging.INFO)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdeks-chaos-"))
    config = ChaosConfig(
        tasks=args.tasks,
        kills=args.kills,
        interval_s=args.interval,
        seed=args.seed,
        workdir=workdir,
    )
    report = run_chaos(config)
    for line in report.diagnosis:
        print(line)
    clean = not (report.lost or report.duplicates or report.incomplete or report.strangers)
    if clean and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not clean:
        print(f"logs kept in {workdir / 'logs'}")
    print(report.table())
    print(report.line())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
