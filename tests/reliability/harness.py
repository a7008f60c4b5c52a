"""An in-process dispatcher on the moto stack, driven one SQS message at a time.

`Harness` builds the real `Dispatcher` (aiobotocore clients, task table,
link resolver that knows no DNS name, router) without its receive loops,
with one pod double (`tests.dispatcher.conftest.FakePod`, which claims and
publishes through the real `Reporter`). Tests deliver messages the way real
ones arrive (`Delivery`), then `handle_all` receives them and hands each to
`Dispatcher._handle`, the coroutine that owns one message from receipt to
deletion, and `expect` says what the contract demands of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks._common import queue_depth
from dispatcher.app import build_policy
from dispatcher.leases import LeaseKeeper
from dispatcher.links import LinkPolicy, LinkResolver, find_links
from dispatcher.metrics import Metrics
from dispatcher.pods import PodClient
from dispatcher.routing import Router
from dispatcher.service import Dispatcher, Source
from dispatcher.settings import DispatcherSettings
from sdeks import aws as sdeks_aws
from sdeks.bounds import check_task
from sdeks.callback import Callback
from sdeks.client import CallbackListener
from sdeks.envelope import Task, TaskType, parse_task, unwrap_sns
from sdeks.errors import InvalidEnvelopeError, InvalidParameterError
from sdeks.lifecycle import Reporter
from sdeks.tasks import TaskTable
from tests.dispatcher.conftest import FakePod
from tests.helpers import drain_callbacks

RUNTIME = "sdruntime"
LINK_CODES = {"link_forbidden", "link_unreachable", "link_too_large", "not_an_image"}
#: Replaced by the output bucket (allow-listed for s3:// links) in delivered bodies.
OUTPUT = "__OUTPUT_BUCKET__"


async def no_dns(host: str) -> list[str]:
    raise OSError(f"no DNS in this test ({host})")


def plain_task(task_id: str, *, prefix: str, prompt: str = "a cat") -> dict[str, Any]:
    """The envelope of a small valid text-to-image task, which the pod double serves."""
    return Task(
        id=task_id,
        runtime=RUNTIME,
        tasktype=TaskType.TEXT_TO_IMAGE,
        prefix=prefix,
        content={"prompt": prompt, "steps": 2},
    ).to_envelope()


@dataclass(frozen=True)
class Delivery:
    """How one body reaches a queue."""

    body: str
    #: "sns": published to the task topic; "sqs": sent raw to `queue`.
    via: str
    attribute: str | None = None  # the SNS `runtime` attribute
    #: Its SNS data type: "String", or "String.Array" / "Number" (several values, a number)
    attribute_type: str = "String"
    queue: str = RUNTIME  # RUNTIME or "catch-all" (raw sends)
    sqs_attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class Expected:
    """What one handled message must produce."""

    task_id: str | None
    #: Acceptable (status, code) pairs of its one callback; None: no callback.
    outcomes: frozenset[tuple[str, str | None]] | None
    #: Refused before admission (`Reporter.refuse`): it claims `task_id` only if no live
    #: task holds it, else its callback goes out with ``id: null``.
    refusal: bool = False
    #: The callback may not come (which message of a group wins is a race).
    optional: bool = False
    #: The message's id (SNS message id, else SQS): SNS fan-out gives two copies one id.
    message_id: str | None = None


class Harness:
    """A real dispatcher (minus its receive loops) on the moto stack, with one pod double."""

    def __init__(self, aws: Any, stack: Any) -> None:
        self.aws, self.stack = aws, stack
        self.exit = contextlib.AsyncExitStack()
        self.finished: set[str] = set()
        self.handled = 0
        self.kinds: Counter[str] = Counter()
        self.rejected = 0
        self.callbacks_listener = self.exit.enter_context(
            CallbackListener(aws.sns, aws.sqs, stack.callback_topic_arn)
        )

    async def start(self, behaviours: list[Any] | None = None, **settings_: Any) -> None:
        """`behaviours`: one `FakePod.behaviour` per pod (None: one plain pod); `settings_`
        override the dispatcher's settings."""
        stack = self.stack
        sqs, sns, s3, dynamodb = [
            await self.exit.enter_async_context(sdeks_aws.aio_client(name))
            for name in ("sqs", "sns", "s3", "dynamodb")
        ]
        self.sqs = sqs
        self.reporter = reporter = Reporter(
            sns, stack.callback_topic_arn, table=TaskTable(dynamodb, stack.task_table)
        )
        self.pods = []
        for behaviour in behaviours or [None]:
            pod = await FakePod(
                sns=self.aws.sns,
                topic_arn=stack.callback_topic_arn,
                reporter=reporter,
                behaviour=behaviour,
            ).start()
            self.exit.push_async_callback(pod.stop)
            self.pods.append(pod)
        self.pod = self.pods[0]
        urls = [pod.url for pod in self.pods]
        settings = DispatcherSettings(
            callback_topic_arn=stack.callback_topic_arn,
            output_bucket=stack.output_bucket,
            task_table=stack.task_table,
            queues=stack.queues,
            catch_all_queue_url=stack.catch_all_queue_url,
            pods={RUNTIME: urls},
            metrics_port=0,
            state_interval_s=0.2,
            s3_allow_buckets=[stack.output_bucket],
            **({"link_timeout_s": 2} | settings_),
        )
        links = await self.exit.enter_async_context(
            LinkResolver(LinkPolicy.from_settings(settings), s3=s3, resolver=no_dns)
        )
        session = await self.exit.enter_async_context(aiohttp.ClientSession(trust_env=False))
        self.metrics = Metrics()
        self.router = Router(
            build_policy(settings),
            PodClient(session, job_timeout_s=30, state_timeout_s=5),
            metrics=self.metrics,
            state_interval_s=0.2,
        )
        self.router.set_pods(RUNTIME, urls)
        planning = asyncio.create_task(self.router.run())
        self.exit.push_async_callback(_cancel, planning)
        self.leases = LeaseKeeper(sqs, extension_s=60, interval_s=20)
        self.sources = {
            RUNTIME: Source(stack.queues[RUNTIME], RUNTIME, 5),
            "catch-all": Source(stack.catch_all_queue_url, None, 5),
        }
        self.dispatcher = Dispatcher(
            settings,
            sqs=sqs,
            sns=sns,
            s3=s3,
            links=links,
            router=self.router,
            leases=self.leases,
            metrics=self.metrics,
            sources=list(self.sources.values()),
            reporter=reporter,
        )

    async def close(self) -> None:
        await self.exit.aclose()

    # --- one batch ---------------------------------------------------------------

    def deliver(self, items: list[Delivery]) -> int:
        """Publish or send each item (batched where small); returns how many were accepted."""
        small = [d for d in items if len(d.body) < 16_000]
        accepted = sum(self._deliver_one(d) for d in items if len(d.body) >= 16_000)
        for via, target in {(d.via, d.queue if d.via == "sqs" else "") for d in small}:
            group = [d for d in small if d.via == via and (via == "sns" or d.queue == target)]
            entries = [{"Id": str(i), **self._request(d)} for i, d in enumerate(group)]
            if via == "sns":
                for entry in entries:
                    entry.pop("TopicArn")
                answer = self.aws.sns.publish_batch(
                    TopicArn=self.stack.task_topic_arn, PublishBatchRequestEntries=entries
                )
            else:
                for entry in entries:
                    entry.pop("QueueUrl")
                answer = self.aws.sqs.send_message_batch(
                    QueueUrl=self.sources[target].queue_url, Entries=entries
                )
            accepted += len(answer.get("Successful", []))
        return accepted

    def _request(self, delivery: Delivery) -> dict[str, Any]:
        body = delivery.body.replace(OUTPUT, self.stack.output_bucket)
        if delivery.via == "sns":
            request: dict[str, Any] = {"TopicArn": self.stack.task_topic_arn, "Message": body}
            if delivery.attribute:
                request["MessageAttributes"] = {
                    "runtime": {
                        "DataType": delivery.attribute_type,
                        "StringValue": delivery.attribute,
                    }
                }
            return request
        return {
            "QueueUrl": self.sources[delivery.queue].queue_url,
            "MessageBody": body,
            "MessageAttributes": {
                name: {"DataType": "String", "StringValue": value}
                for name, value in delivery.sqs_attributes.items()
                if value
            },
        }

    def _deliver_one(self, delivery: Delivery) -> bool:
        client = self.aws.sns if delivery.via == "sns" else self.aws.sqs
        call = client.publish if delivery.via == "sns" else client.send_message
        try:
            call(**self._request(delivery))
        except client.exceptions.ClientError as exc:  # refused by SNS/SQS: never reaches us
            assert exc.response["Error"]["Code"] in {
                "InvalidParameter",
                "InvalidParameterValue",
                "InvalidMessageContents",
            }, exc
            return False
        return True

    def expect(self, source: Source, message: dict[str, Any]) -> Expected:
        """The contract's answer for one received message: a task's outcome, or a failed
        callback for anything that is not a task (tests/reliability/test_fuzz_dispatcher.py)."""
        try:
            note = unwrap_sns(message["Body"])
        except RecursionError:  # not a task either (tests/reliability/test_found_bugs.py)
            self.kinds["invalid_envelope"] += 1
            self.rejected += 1
            return Expected(None, frozenset({("failed", "invalid_envelope")}))
        raw = note.typed_attributes.get("runtime")
        if raw is not None and raw.type == "String.Array" and note.message_id:
            named = json.loads(raw.value)
            owner = next((r for r in named if r in self.stack.queues), None)
            if owner is not None and owner != source.runtime:
                # SNS's copy in `owner`'s queue serves it; this one is dropped unparsed.
                self.kinds["fan-out copy"] += 1
                return Expected(None, None)
        attributes = {
            k: v["StringValue"]
            for k, v in (message.get("MessageAttributes") or {}).items()
            if v.get("DataType") == "String"
        }
        hint = note.runtime or attributes.get("runtime") or source.runtime
        message_id = note.message_id or message["MessageId"]
        try:
            task = parse_task(
                note.body, runtime=hint, fallback_id=note.message_id or message["MessageId"]
            )
        except InvalidEnvelopeError as exc:
            self.kinds["invalid_envelope"] += 1
            self.rejected += 1
            return Expected(
                exc.task_id,
                frozenset({("failed", "invalid_envelope")}),
                True,
                message_id=message_id,
            )
        assert isinstance(task, Task)
        try:
            check_task(task)
        except InvalidParameterError:
            self.kinds["invalid_parameter"] += 1
            self.rejected += 1
            return Expected(
                task.id, frozenset({("failed", "invalid_parameter")}), True, message_id=message_id
            )
        if task.runtime not in self.stack.queues:
            self.kinds["unknown_runtime"] += 1
            self.rejected += 1
            return Expected(
                task.id, frozenset({("failed", "unknown_runtime")}), True, message_id=message_id
            )
        if task.runtime != source.runtime:
            self.kinds["forwarded"] += 1
            return Expected(task.id, None)
        outcomes = {("succeeded", None)}
        if find_links(task.content):
            self.kinds["with_links"] += 1
            outcomes = {("failed", code) for code in LINK_CODES}
        else:
            self.kinds["to_pod"] += 1
        return self._once(task.id, frozenset(outcomes))

    def _once(self, task_id: str, outcomes: frozenset[tuple[str, str | None]]) -> Expected:
        return Expected(task_id, outcomes)

    async def handle_all(self) -> list[Expected]:
        """Receive and handle until both queues are empty (forwarded tasks come back).

        The messages of one receive are handled concurrently, as the dispatcher's
        receive loop does; the expectations of tasks that share an id are merged
        (one of them ends it, whichever comes first).
        """
        expected: list[Expected] = []
        while True:
            received = []
            for source in self.sources.values():
                answer = await self.sqs.receive_message(
                    QueueUrl=source.queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=0,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
                received += [(source, m) for m in answer.get("Messages", [])]
            if not received:
                return expected
            expected += self.expect_concurrent([self.expect(s, m) for s, m in received])
            await asyncio.gather(*(self.dispatcher._handle(s, m) for s, m in received))
            self.handled += len(received)

    def expect_concurrent(self, each: list[Expected]) -> list[Expected]:
        """The expectations of one receive, handled concurrently, as `Outcomes`."""
        out: list[Expected] = []
        groups: dict[str, list[Expected]] = {}
        for e in each:
            if e.task_id is None:
                out.append(Expected(None, e.outcomes, e.refusal))
            else:
                groups.setdefault(e.task_id, []).append(e)
        for task_id, group in groups.items():
            before = len(out)
            self._expect_group(task_id, group, out)
            # one expectation per message (those that produce nothing say so)
            out.extend(Expected(task_id, None) for _ in range(len(group) - (len(out) - before)))
        return out

    def _expect_group(self, task_id: str, group: list[Expected], out: list[Expected]) -> None:
        """One id's messages in one receive (see `expect_concurrent`)."""
        ending = [e for e in group if e.outcomes is not None]
        if task_id in self.finished or not ending:
            # Ended already (or only forwarded here): valid copies are dropped,
            # refusals go out without the id (or not at all: a copy of a refused
            # message whose refusal already claimed the id).
            for e in ending:
                if e.refusal:
                    out.append(Expected(None, e.outcomes, True, optional=True))
            return
        self.finished.add(task_id)
        # Exactly one callback carries the id; every other refusal of the group goes
        # out with id null (one of them may be the winner instead). Another copy of a
        # refused message (SNS fan-out: same message id) publishes nothing if its twin
        # claimed the id (`Reporter.refuse`), id null if a task holds it.
        union = frozenset().union(*(e.outcomes for e in ending if e.outcomes))
        out.append(Expected(task_id, union))
        refusals = [e for e in ending if e.refusal]
        seen: set[str | None] = set()
        for i, e in enumerate(refusals):
            copy = e.message_id is not None and e.message_id in seen
            seen.add(e.message_id)
            out.append(Expected(None, e.outcomes, True, optional=i == 0 or copy))

    def callbacks(self) -> list[Callback]:
        return drain_callbacks(self.callbacks_listener)

    def in_flight(self) -> int:
        return sum(queue_depth(self.aws.sqs, s.queue_url) for s in self.sources.values())


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
