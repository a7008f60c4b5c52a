"""What the benchmarks share: tables, the moto server process, pod doubles, the dispatcher process.

Every service a benchmark measures runs in its own process, as in the local
stack, so the process under test competes for the CPU the way it would there:

    MotoServer        `python -m benchmarks._common moto`: moto server (S3, SNS,
                      SQS, DynamoDB) on 127.0.0.1, made faithful as the local
                      stack's (`sdeks.local.make_moto_faithful`), its SQS calls
                      freed of per-message clock costs (`make_moto_sqs_fast`),
                      counting the API calls it serves
    PodFleet          `python -m benchmarks._common pods`: pod doubles, one port each,
                      speaking the pod contract (`POST /v1/jobs`, `GET /v1/state` in
                      the shape runtime/app.py serves, `POST /v1/prefetch`) plus
                      `/bench/*` control routes
    DispatcherProcess `python -m dispatcher`, configured through `SDEKS_*` variables
                      like `sdeks.local.LocalStack.dispatcher_env()` does

Pod doubles come in two kinds: `instant` answers every job at once with a
succeeded callback (it publishes nothing: the dispatcher's own cost is what is
measured); `sleep` sleeps `inference` (+ `switch` when the job's model is not
its active model) time units and reports its active model on the GPU tier, so
the dispatcher's affinity policy sees what a real pod would report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runtime.settings import RuntimeSettings  # noqa: E402
from sdeks.envelope import Task, TaskType  # noqa: E402
from sdeks.grace import RESERVED, FirstCall  # noqa: E402
from sdeks.local import LOCAL_CREDENTIALS, OFFLINE, free_port  # noqa: E402

RUNTIME = "sdruntime"
#: The pods' first call for the replica whose job ended (seconds), as the runtime's default.
FIRST_CALL_S: float = RuntimeSettings.model_fields["first_call_s"].default


# --- output ------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Right-aligned columns, a dashed rule under the header (as benchmarks/scheduling.py)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def machine() -> str:
    """One line about where the numbers come from."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, load {load}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process `pid` (and threads it starts later) on `cpus` only."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


class CpuSampler:
    """Samples processes' CPU time every `interval_s` in a thread, to read it for any window.

    `between(t0, t1)` gives each process's CPU seconds between two wall-clock
    times (linear between samples), so a benchmark can charge CPU to exactly
    the window it measures, without start-up costs.
    """

    def __init__(self, pids: dict[str, int], interval_s: float = 0.02) -> None:
        import threading

        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        values = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, IndexError, ValueError):
                values[name] = cpu_seconds(pid)
        self.samples.append((time.time(), values))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)
        self._sample()

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float, name: str) -> float:
        points = [(ts, v[name]) for ts, v in self.samples if name in v]
        if not points:
            return math.nan
        for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
            if t0 <= t <= t1:
                return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return points[0][1] if t < points[0][0] else points[-1][1]

    def between(self, t0: float, t1: float) -> dict[str, float]:
        return {name: self.at(t1, name) - self.at(t0, name) for name in self.pids}


# --- child processes -----------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child service: local credentials, offline, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_PROFILE"}
    env.update(LOCAL_CREDENTIALS)
    env.update(OFFLINE)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until(
    check: Any,
    *,
    timeout_s: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    interval_s: float = 0.05,
) -> Any:
    """Call `check()` until it returns a truthy value, which is returned; errors count as not yet."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval_s)
    raise RuntimeError(f"{what} not ready within {timeout_s:g} s (last error: {last})")


class _Child:
    """A child process whose output goes to a log file, stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class _Service:
    """A benchmark's helper process (`_child`): its pid, stopped on leaving a `with`."""

    _child: _Child

    @property
    def pid(self) -> int:
        return self._child.proc.pid

    def stop(self) -> None:
        self._child.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoServer(_Service):
    """moto server in its own process, so every client hits it alike."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stats = workdir / "moto-calls.json"
        self._seq = 0
        cmd = [sys.executable, "-m", "benchmarks._common", "moto", "--port", str(self.port)]
        cmd += ["--stats", str(self._stats)]
        self._child = _Child("moto", cmd, child_env(), workdir)
        try:
            wait_until(
                lambda: self.client("sqs").list_queues() is not None,
                timeout_s=60,
                what="moto server",
                proc=self._child.proc,
            )
        except Exception:
            self.stop()
            raise

    def calls(self) -> dict[str, int]:
        """API calls served so far, by `service.Action` (cumulative)."""
        self._child.proc.send_signal(signal.SIGUSR1)
        self._seq += 1

        def read() -> dict[str, int] | None:
            doc = json.loads(self._stats.read_text())
            return doc["calls"] if doc["seq"] >= self._seq else None

        return wait_until(read, timeout_s=10, what="moto call counts")

    def client(self, service: str, **config: Any) -> Any:
        from sdeks import aws

        credentials = {
            "aws_access_key_id": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }
        return aws.client(service, endpoint_url=self.endpoint, credentials=credentials, **config)

    def new_stack(
        self, runtimes: Sequence[str] = (RUNTIME,), *, visibility_timeout_s: int | None = None
    ) -> Any:
        """A freshly named copy of the stack's resources (empty queues); the queues'
        visibility timeout is the stack's unless `visibility_timeout_s` is given."""
        from sdeks.names import StackNames
        from sdeks.resources import create_stack_resources

        clients = {s: self.client(s) for s in ("sns", "sqs", "s3", "dynamodb")}
        extra = (
            {} if visibility_timeout_s is None else {"visibility_timeout_s": visibility_timeout_s}
        )
        return create_stack_resources(
            **clients,
            runtimes=list(runtimes),
            names=StackNames(prefix=f"b{uuid.uuid4().hex[:8]}"),
            **extra,
        )


class PodFleet(_Service):
    """`count` pod doubles of one kind, served by one child process."""

    def __init__(
        self, workdir: Path, *, kind: str, count: int, slots: int = 1, name: str = "pods"
    ) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        cmd = [sys.executable, "-m", "benchmarks._common", "pods", "--kind", kind]
        cmd += ["--ports", ",".join(map(str, self.ports)), "--slots", str(slots)]
        self._child = _Child(name, cmd, child_env(), workdir)
        try:
            for url in self.urls:
                wait_until(
                    lambda url=url: _get_json(f"{url}/v1/state"),
                    timeout_s=60,
                    what=f"pod double {url}",
                    proc=self._child.proc,
                )
        except Exception:
            self.stop()
            raise

    def records(self) -> list[dict[str, Any]]:
        """Every job each pod ran since the last reset, with the pod's URL."""
        out = []
        for url in self.urls:
            for record in _get_json(f"{url}/bench/records")["records"]:
                out.append({**record, "pod": url})
        return out

    def done(self) -> int:
        """Jobs the pods finished since the last reset: one cheap call (any pod answers for
        every pod of its process), so asking often costs the pods' event loop little."""
        return int(_get_json(f"{self.urls[0]}/bench/done")["done"])

    def refused(self) -> int:
        """Jobs the pods answered 429 since the last reset (full, or `reserved`)."""
        docs = [_get_json(f"{url}/bench/records") for url in self.urls]
        return sum(d["refused"] + d["reserved"] for d in docs)

    def reserved(self) -> int:
        """Of those, the 429 `reserved`: first call for another dispatcher replica."""
        return sum(_get_json(f"{url}/bench/records")["reserved"] for url in self.urls)

    def reset(self, **settings: Any) -> None:
        """Forget records and active models; `settings` (open_at, unit, inference, switch,
        first_call_s)."""
        for url in self.urls:
            _post_json(f"{url}/bench/reset", settings)


class DispatcherProcess(_Service):
    """`python -m dispatcher` against `stack`'s queues with static pods, as the local stack runs it."""

    def __init__(
        self,
        workdir: Path,
        moto: MotoServer,
        stack: Any,
        pods: Sequence[str],
        *,
        task_table: bool = False,
        name: str = "dispatcher",
        **settings: Any,
    ) -> None:
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        env = {
            "AWS_ENDPOINT_URL": moto.endpoint,
            "SDEKS_CALLBACK_TOPIC_ARN": stack.callback_topic_arn,
            "SDEKS_OUTPUT_BUCKET": stack.output_bucket,
            "SDEKS_QUEUES": json.dumps(stack.queues),
            "SDEKS_CATCH_ALL_QUEUE_URL": stack.catch_all_queue_url,
            "SDEKS_DISCOVERY": "static",
            "SDEKS_PODS": json.dumps({RUNTIME: list(pods)}),
            "SDEKS_LINK_ALLOW_NETS": json.dumps(["127.0.0.1/32"]),
            "SDEKS_METRICS_PORT": str(self.metrics_port),
            "SDEKS_METRICS_HOST": "127.0.0.1",
        }
        if task_table:
            env["SDEKS_TASK_TABLE"] = stack.task_table
        env.update({f"SDEKS_{k.upper()}": str(v) for k, v in settings.items()})
        self._child = _Child(name, [sys.executable, "-m", "dispatcher"], child_env(**env), workdir)
        try:
            wait_until(
                lambda: _get_text(self.metrics_url),
                timeout_s=60,
                what="dispatcher",
                proc=self._child.proc,
            )
        except Exception as exc:
            tail = self._child.log_tail()
            self.stop()
            raise RuntimeError(f"{exc}\n{tail}") from exc

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(_get_text(self.metrics_url)):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def log_tail(self, chars: int = 3000) -> str:
        return self._child.log_tail(chars)


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _get_json(url: str) -> Any:
    return json.loads(_get_text(url))


def _post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


@contextlib.contextmanager
def workdir(keep: bool = False) -> Any:
    """A scratch folder for logs and files, removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix="sdeks-bench-"))
    try:
        yield path
    finally:
        if not keep:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


# --- messages ------------------------------------------------------------------


def envelope(task_id: str, *, model: str | None = None, **content: Any) -> dict[str, Any]:
    """A canonical text-to-image task (DESIGN.md's envelope), 512x512 like a real one."""
    body: dict[str, Any] = {"prompt": "a cat wizard", "steps": 30, "width": 512, "height": 512}
    body.update(content)
    if model:
        body.setdefault("alwayson_scripts", {})["sd_model_checkpoint"] = model
    return Task(
        id=task_id,
        runtime=RUNTIME,
        tasktype=TaskType.TEXT_TO_IMAGE,
        prefix="bench",
        context={"bench": True},
        content=body,
    ).to_envelope()


def runtime_attribute(runtime: str = RUNTIME) -> dict[str, Any]:
    return {"runtime": {"DataType": "String", "StringValue": runtime}}


def sns_notification(
    message: dict[str, Any], *, topic_arn: str, published_at: float, runtime: str = RUNTIME
) -> str:
    """The body SNS delivers to a subscribed queue (raw delivery off), with our timestamp."""
    stamp = datetime.fromtimestamp(published_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": topic_arn,
            "Message": json.dumps(message),
            "Timestamp": stamp,
            "SignatureVersion": "1",
            "MessageAttributes": {"runtime": {"Type": "String", "Value": runtime}},
        }
    )


def publish_all(sns: Any, topic_arn: str, messages: Sequence[dict[str, Any]]) -> None:
    """Publish through SNS (10 per PublishBatch call), routed by the `runtime` attribute."""
    for i in range(0, len(messages), 10):
        entries = [
            {
                "Id": str(j),
                "Message": json.dumps(m),
                "MessageAttributes": runtime_attribute(),
            }
            for j, m in enumerate(messages[i : i + 10])
        ]
        answer = sns.publish_batch(TopicArn=topic_arn, PublishBatchRequestEntries=entries)
        if answer.get("Failed"):
            raise RuntimeError(f"publish failed: {answer['Failed'][:3]}")


#: Every message still in a queue: visible, in flight, and not yet delivered.
DEPTH_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


def queue_depth(sqs: Any, url: str) -> int:
    """How many messages the queue still holds (`DEPTH_ATTRIBUTES`)."""
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(DEPTH_ATTRIBUTES))
    return sum(int(attributes["Attributes"][name]) for name in DEPTH_ATTRIBUTES)


# --- the pod doubles (child process) ---------------------------------------------


class _PodDouble:
    """One pod double. `instant`: answers at once. `sleep`: sleeps the job's cost in time units."""

    def __init__(self, name: str, kind: str, slots: int) -> None:
        self.name = name
        self.kind = kind
        self.slots = slots
        self.reset({})

    def reset(self, settings: dict[str, Any]) -> None:
        self.records: list[dict[str, Any]] = []
        #: Jobs refused with 429 (no free slot, or before `open_at`).
        self.refused = 0
        #: Jobs refused with 429 `reserved` (first call for another replica).
        self.reserved = 0
        self.busy = 0
        self.active: str | None = settings.get("active")
        #: Before this epoch time the pod reports no free slot (the burst starts together).
        self.open_at = float(settings.get("open_at", 0.0))
        self.unit = float(settings.get("unit", 0.02))
        self.inference = float(settings.get("inference", 1.0))
        self.switch = float(settings.get("switch", 0.0))
        #: First call for the replica whose job ended (`sdeks.grace`), as the runtime.
        self.first_call = FirstCall(float(settings.get("first_call_s", FIRST_CALL_S)))

    def state(self) -> dict[str, Any]:
        free = max(0, self.slots - self.busy) if time.time() >= self.open_at else 0
        gpu = [self.active] if self.active else []
        return {
            "runtime": RUNTIME,
            "device": "cpu",
            "models": {
                "device": "cpu",
                "dtype": "float32",
                "gpu": gpu,
                "ram": gpu,
                "disk": gpu,
                "loading": [],
                "in_use": gpu if self.busy else [],
                "bytes": {"gpu": 0, "ram": 0, "disk": 0},
                "budget_bytes": {"gpu": 0, "ram": 0, "disk": 0},
            },
            "default_model": None,
            "busy": self.busy > 0,
            "slots": self.slots,
            "free_slots": free,
            "reserved": held.to_json() if (held := self.first_call.current()) else None,
            "running": [],
        }

    async def job(self, body: bytes) -> tuple[int, dict[str, Any]]:
        received = time.time()
        doc = json.loads(body)
        task = doc["task"]
        if self.busy >= self.slots or received < self.open_at:
            self.refused += 1
            return 429, {"detail": "no free slot", "free_slots": 0}
        model = doc.get("model")
        held = self.first_call.refuses(doc.get("replica"), model or "")
        if held is not None:
            self.reserved += 1
            return 429, {"code": RESERVED, "message": "first call", "reserved": held.to_json()}
        record: dict[str, Any] = {"id": task["id"], "model": model, "start": received}
        self.busy += 1
        try:
            if self.kind == "sleep":
                switched = model != self.active
                self.active = model
                cost = self.inference + (self.switch if switched else 0.0)
                record["switch"] = switched
                await asyncio.sleep(cost * self.unit)
            record["end"] = time.time()
            self.records.append(record)
        finally:
            self.busy -= 1
            self.first_call.ended(doc.get("replica"), model or "")
        return 200, {
            "id": task["id"],
            "runtime": task["runtime"],
            "tasktype": task["tasktype"],
            "status": "succeeded",
            "result": True,
            "output_location": f"s3://bench/{task['prefix']}/{task['id']}",
            "image_url": [],
            "seeds": [1],
            "context": task.get("context"),
            "error": None,
        }


async def _serve_pods(kind: str, ports: list[int], slots: int) -> None:
    from aiohttp import web

    from sdeks.demand import DemandBoard, DemandError, DemandReport

    runners = []
    pods: list[_PodDouble] = []
    for port in ports:
        pod = _PodDouble(f"pod-{port}", kind, slots)
        pods.append(pod)

        async def state(_: web.Request, pod: _PodDouble = pod) -> web.Response:
            return web.json_response(pod.state())

        board = DemandBoard()

        async def report(request: web.Request, pod: _PodDouble = pod, board=board) -> web.Response:
            # The runtime's relay of the replicas' waiting work (sdeks.demand), as it is.
            try:
                got = DemandReport.parse(await request.json())
            except (DemandError, ValueError) as exc:
                return web.json_response({"detail": str(exc)}, status=400)
            board.report(got)
            demand, other = board.others(got.replica)
            return web.json_response({**pod.state(), "demand": demand, "demand_other": other})

        async def job(request: web.Request, pod: _PodDouble = pod) -> web.Response:
            status, doc = await pod.job(await request.read())
            return web.json_response(doc, status=status)

        async def prefetch(_: web.Request) -> web.Response:
            # Accepted and ignored: the simulator's pods have no RAM tier either.
            return web.json_response({"accepted": True}, status=202)

        async def records(_: web.Request, pod: _PodDouble = pod) -> web.Response:
            return web.json_response(
                {"records": pod.records, "refused": pod.refused, "reserved": pod.reserved}
            )

        async def done(_: web.Request) -> web.Response:
            return web.json_response({"done": sum(len(p.records) for p in pods)})

        async def reset(request: web.Request, pod: _PodDouble = pod) -> web.Response:
            pod.reset(await request.json())
            return web.json_response(None)

        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/v1/state", state)
        app.router.add_post("/v1/state", report)
        app.router.add_post("/v1/jobs", job)
        app.router.add_post("/v1/prefetch", prefetch)
        app.router.add_get("/bench/records", records)
        app.router.add_get("/bench/done", done)
        app.router.add_post("/bench/reset", reset)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


def make_moto_sqs_fast() -> None:
    """Take moto's per-message bookkeeping costs out of its SQS calls.

    moto 5 reads the clock through datetime arithmetic (~9 us), and walks every
    message of a queue, reading the clock twice each, whenever it computes a
    queue's attributes - which SendMessage does for each message (to read
    ContentBasedDeduplication) and ReceiveMessage does for each message it
    returns (to read MessageRetentionPeriod). A receive of 10 from a queue of
    N messages then costs ~30 N clock reads: 0.25 s at N=300, more than 1 s at
    N=2000 on this machine, and publishing 2000 tasks takes 70 s. Both sides
    of a benchmark would pay it, but the figures would measure moto's walks,
    not the consumers. This reads the clock with `time.time()` (what moto's
    version computes, without freezegun) and the retention period as the one
    attribute; what every call returns is unchanged.
    """
    from moto.core import utils
    from moto.sqs import models

    def unix_time(dt: Any = None) -> float:
        return time.time() if dt is None else utils.unix_time(dt)

    def unix_time_millis(dt: Any = None) -> float:
        return time.time() * 1000.0 if dt is None else utils.unix_time_millis(dt)

    def is_message_valid_based_on_retention_period(
        self: Any, queue_name: str, message: Any
    ) -> bool:
        retention = int(self.get_queue(queue_name).message_retention_period)
        return retention + message.sent_timestamp / 1000 > unix_time()

    models.unix_time = unix_time  # type: ignore[attr-defined]
    models.unix_time_millis = unix_time_millis  # type: ignore[attr-defined]
    models.SQSBackend.is_message_valid_based_on_retention_period = (  # type: ignore[method-assign]
        is_message_valid_based_on_retention_period
    )


def _count_moto_calls(calls: dict[str, int]) -> None:
    """Count every API call moto serves, by `service.Action`."""
    import threading

    from moto.core.responses import BaseResponse

    original = BaseResponse.call_action
    lock = threading.Lock()

    def call_action(self: Any) -> Any:
        key = f"{getattr(self, 'service_name', '?')}.{self._get_action()}"
        with lock:
            calls[key] = calls.get(key, 0) + 1
        return original(self)

    BaseResponse.call_action = call_action  # type: ignore[method-assign]


def _serve_moto(port: int, stats: Path) -> None:
    from moto.server import ThreadedMotoServer

    from sdeks.local import make_moto_faithful

    make_moto_faithful()  # as the local stack's moto: atomic DynamoDB writes and SQS deletes
    make_moto_sqs_fast()
    calls: dict[str, int] = {}
    _count_moto_calls(calls)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stopped = False
    dumps = 0

    def stop(*_: object) -> None:
        nonlocal stopped
        stopped = True

    def dump(*_: object) -> None:
        nonlocal dumps
        dumps += 1
        tmp = stats.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": dumps, "calls": dict(calls)}))
        os.replace(tmp, stats)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, dump)
    while not stopped:
        time.sleep(0.1)
    server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark helper processes")
    sub = parser.add_subparsers(dest="what", required=True)
    moto = sub.add_parser("moto")
    moto.add_argument("--port", type=int, required=True)
    moto.add_argument("--stats", type=Path, required=True, help="call counts go here on SIGUSR1")
    pods = sub.add_parser("pods")
    pods.add_argument("--kind", choices=["instant", "sleep"], required=True)
    pods.add_argument("--ports", required=True, help="comma-separated, one pod each")
    pods.add_argument("--slots", type=int, default=1)
    args = parser.parse_args(argv)
    if args.what == "moto":
        _serve_moto(args.port, args.stats)
    else:
        asyncio.run(_serve_pods(args.kind, [int(p) for p in args.ports.split(",")], args.slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
