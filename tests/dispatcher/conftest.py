"""Dispatcher test helpers: fake pods (test doubles of the pod's HTTP contract,
on 127.0.0.1), a callback reader, and a running dispatcher on the moto stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from dispatcher.app import serve
from dispatcher.metrics import Metrics
from dispatcher.settings import DispatcherSettings
from sdeks.callback import Callback, TaskStatus
from sdeks.demand import DemandBoard, DemandError, DemandReport
from sdeks.job import Job


@dataclass
class FakePod:
    """A pod double: records jobs; `behaviour(job)` decides the answer.

    On 200 it publishes the callback to the real (moto) callback topic, as a
    real pod does, so tests can count terminal callbacks.
    """

    sns: Any
    topic_arn: str
    gpu: list[str] = field(default_factory=list)
    slots: int = 1
    delay_s: float = 0.0
    behaviour: Callable[[Job], Awaitable[web.StreamResponse | None]] | None = None
    jobs: list[Job] = field(default_factory=list)
    state_calls: int = 0
    url: str = ""
    runner: web.AppRunner | None = None
    busy: int = 0
    extra_state: dict[str, Any] = field(default_factory=dict)
    #: Set to e.g. 503 to make `/v1/state` stop answering properly.
    state_status: int = 200
    #: Ends tasks through the task table (claim, then publish), as the real pod does.
    reporter: Any = None
    prefetched: list[str] = field(default_factory=list)
    #: Answers `POST /v1/state` (the replicas' demand relay) as the runtime does,
    #: with the runtime's own `DemandBoard`; False: an older pod (405).
    relays_demand: bool = True
    demand: DemandBoard = field(default_factory=DemandBoard)
    #: Ids whose callback this pod published, in order.
    finished: list[str] = field(default_factory=list)

    async def start(self) -> FakePod:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/state", self._state)
        if self.relays_demand:
            app.router.add_post("/v1/state", self._report)
        app.router.add_post("/v1/jobs", self._job)
        app.router.add_post("/v1/prefetch", self._prefetch)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _state(self, _: web.Request) -> web.Response:
        self.state_calls += 1
        if self.state_status != 200:
            return web.Response(status=self.state_status)
        doc = {
            "models": {"gpu": self.gpu, "ram": [], "disk": []},
            "busy": self.busy > 0,
            "slots": self.slots,
            "free_slots": max(0, self.slots - self.busy),
            **self.extra_state,
        }
        return web.json_response(doc)

    async def _report(self, request: web.Request) -> web.Response:
        try:
            report = DemandReport.parse(await request.json())
        except (DemandError, ValueError) as exc:
            return web.json_response({"detail": str(exc)}, status=400)
        self.demand.report(report)
        response = await self._state(request)
        if response.status != 200:
            return response
        demand, other = self.demand.others(report.replica)
        doc = json.loads(response.body)  # type: ignore[arg-type]
        return web.json_response({**doc, "demand": demand, "demand_other": other})

    async def _prefetch(self, request: web.Request) -> web.Response:
        self.prefetched.append((await request.json())["model"])
        return web.json_response({"accepted": True}, status=202)

    async def _job(self, request: web.Request) -> web.StreamResponse:
        job = Job.model_validate_json(await request.read())
        self.jobs.append(job)
        self.busy += 1
        try:
            if self.behaviour is not None:
                answer = await self.behaviour(job)
                if answer is not None:
                    return answer
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if job.model:
                self.gpu = [job.model]
            callback = Callback(
                id=job.task.id,
                runtime=job.task.runtime,
                tasktype=job.task.tasktype.value,
                status=TaskStatus.SUCCEEDED,
                result=True,
                context=job.task.context,
            )
            if self.reporter is not None:
                await self.reporter.finish(callback)
            else:
                await asyncio.to_thread(
                    self.sns.publish, **callback.sns_publish_kwargs(self.topic_arn)
                )
            self.finished.append(job.task.id)
            return web.json_response(json.loads(callback.model_dump_json()))
        finally:
            self.busy -= 1


class Callbacks:
    """Reads the callback topic through a queue subscribed to it."""

    def __init__(self, aws: Any, topic_arn: str) -> None:
        self.sqs = aws.sqs
        self.url = aws.sqs.create_queue(QueueName=f"cb-{uuid.uuid4().hex[:12]}")["QueueUrl"]
        arn = aws.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        aws.sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=arn,
            Attributes={"RawMessageDelivery": "true"},
        )
        self.received: list[dict[str, Any]] = []

    def _drain(self) -> None:
        while True:
            answer = self.sqs.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            )
            messages = answer.get("Messages", [])
            if not messages:
                return
            for message in messages:
                self.received.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"])

    async def wait_for(self, count: int, within: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while True:
            await asyncio.to_thread(self._drain)
            if len(self.received) >= count or time.monotonic() > deadline:
                return self.received
            await asyncio.sleep(0.1)

    async def settle(self, seconds: float = 1.0) -> list[dict[str, Any]]:
        """Everything that arrives within `seconds` more (to prove nothing else comes)."""
        await asyncio.sleep(seconds)
        await asyncio.to_thread(self._drain)
        return self.received

    def by_id(self, task_id: str) -> list[dict[str, Any]]:
        return [c for c in self.received if c.get("id") == task_id]


@pytest.fixture
def callbacks(aws, stack) -> Callbacks:
    return Callbacks(aws, stack.callback_topic_arn)


@pytest.fixture
async def make_pod(aws, stack):
    pods: list[FakePod] = []

    async def factory(**kwargs: Any) -> FakePod:
        pod = await FakePod(sns=aws.sns, topic_arn=stack.callback_topic_arn, **kwargs).start()
        pods.append(pod)
        return pod

    yield factory
    for pod in pods:
        await pod.stop()


def settings_for(stack: Any, pods: dict[str, list[str]], **overrides: Any) -> DispatcherSettings:
    values: dict[str, Any] = {
        "callback_topic_arn": stack.callback_topic_arn,
        "output_bucket": stack.output_bucket,
        "queues": stack.queues,
        "catch_all_queue_url": stack.catch_all_queue_url,
        "pods": pods,
        "receive_wait_s": 0,
        "metrics_port": 0,
        "state_interval_s": 0.2,
        "link_allow_nets": ["127.0.0.1/32"],
        "s3_allow_buckets": [stack.output_bucket, stack.models_bucket],
        "grace_period_s": 5,
    }
    values.update(overrides)
    return DispatcherSettings(**values)


@contextlib.asynccontextmanager
async def running(settings: DispatcherSettings, **kwargs: Any) -> AsyncIterator[Metrics]:
    """A dispatcher running in this event loop until the block ends."""
    stop = asyncio.Event()
    metrics = kwargs.pop("metrics", None) or Metrics()
    task = asyncio.create_task(serve(settings, stop, metrics=metrics, **kwargs))
    try:
        yield metrics
    finally:
        stop.set()
        # Draining takes `receive_wait_s` + 5 s and `grace_period_s` at most; the rest
        # is room for a loaded machine. Past it, say what was still running.
        done, _ = await asyncio.wait({task}, timeout=90)
        if not done:
            stacks = "\n".join(
                f"{t.get_name()}: {t.get_coro()!r}\n{_frames(t)}"
                for t in asyncio.all_tasks()
                if t is not asyncio.current_task()
            )
            task.cancel()
            raise AssertionError(f"the dispatcher did not stop within 90 s; tasks:\n{stacks}")
        task.result()


def _frames(task: asyncio.Task[Any]) -> str:
    import io

    out = io.StringIO()
    task.print_stack(limit=8, file=out)
    return out.getvalue()


def publish(aws: Any, stack: Any, envelope: Any, *, runtime: str | None = "sdruntime") -> str:
    kwargs: dict[str, Any] = {
        "TopicArn": stack.task_topic_arn,
        "Message": envelope if isinstance(envelope, str) else json.dumps(envelope),
    }
    if runtime is not None:
        kwargs["MessageAttributes"] = {"runtime": {"DataType": "String", "StringValue": runtime}}
    return aws.sns.publish(**kwargs)["MessageId"]


def envelope(task_id: str, *, runtime: str = "sdruntime", model: str | None = None, **content: Any):
    body: dict[str, Any] = {"prompt": "a cat", "steps": 2, **content}
    if model:
        body.setdefault("alwayson_scripts", {})["sd_model_checkpoint"] = model
    return {
        "task": {
            "metadata": {
                "id": task_id,
                "runtime": runtime,
                "tasktype": "text-to-image",
                "prefix": "output",
                "context": {"n": task_id},
            },
            "content": body,
        }
    }


def queue_depth(aws: Any, url: str) -> int:
    attributes = aws.sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


async def eventually(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
