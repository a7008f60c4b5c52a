"""Webhook delivery from the `webhooks` queue: signed, guarded, recorded."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from dispatcher import webhooks as consumer_module
from dispatcher.leases import LeaseKeeper
from dispatcher.webhooks import WebhookConsumer
from sdeks.aws import aio_client
from sdeks.lifecycle import Reporter
from sdeks.tasks import TaskTable
from sdeks.webhooks import verify_signature
from tests.dispatcher.conftest import envelope, eventually, publish, running, settings_for
from tests.helpers import serve_app

SECRET = "s3cret-for-tests"


async def webhook_outcomes(table: TaskTable, ids: list[str], within: float = 20.0):
    """Each task's recorded webhook status, once all have one."""
    deadline = time.monotonic() + within
    while True:
        records = [await table.get(task_id) for task_id in ids]
        statuses = {r.id: r.webhook_status.value for r in records if r and r.webhook_status}
        if len(statuses) == len(ids) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.1)


async def test_webhooks_signed_delivery_and_private_address_refused(
    aws, stack, make_pod, callbacks
):
    # GIVEN a receiver on 127.0.0.1 (allow-listed) that verifies signatures
    received: list[tuple[bool, dict]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((verify_signature(SECRET, request.headers, body), json.loads(body)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    table = TaskTable(aws.dynamodb, stack.task_table)
    pod = await make_pod(reporter=Reporter(aws.sns, stack.callback_topic_arn, table=table))
    settings = settings_for(
        stack,
        {"sdruntime": [pod.url]},
        task_table=stack.task_table,
        webhook_queue_url=stack.webhook_queue_url,
        webhook_secret=SECRET,
        webhook_retries=0,
    )
    evil = envelope("evil-hook")
    evil["task"]["metadata"]["webhook"] = "http://169.254.169.254/latest/meta-data/"
    async with serve_app(app) as base, running(settings):
        good = envelope("hooked")
        good["task"]["metadata"]["webhook"] = f"{base}/hook"
        publish(aws, stack, good)
        publish(aws, stack, evil)
        await callbacks.wait_for(2)

        statuses = await webhook_outcomes(table, ["hooked", "evil-hook"])
    # THEN the receiver got one signed callback; the metadata address was refused unasked
    assert [(ok, doc["id"], doc["status"]) for ok, doc in received] == [
        (True, "hooked", "succeeded")
    ]
    assert statuses == {
        "hooked": "delivered",
        "evil-hook": "refused",
    }


class RecordingSqs:
    """An SQS client that records, per receive, how many messages were asked for and got."""

    def __init__(self, sqs) -> None:
        self._sqs = sqs
        self.receives: list[tuple[int, int]] = []

    def __getattr__(self, name: str):
        return getattr(self._sqs, name)

    async def receive_message(self, **kwargs):
        answer = await self._sqs.receive_message(**kwargs)
        self.receives.append((kwargs["MaxNumberOfMessages"], len(answer.get("Messages", []))))
        return answer


def send_notifications(aws, queue_url: str, bodies: list[str]) -> None:
    entries = [{"Id": str(n), "MessageBody": body} for n, body in enumerate(bodies)]
    aws.sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)


def messages_left(aws, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) on the queue."""
    attributes = aws.sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


class Deliveries:
    """Stands in for `deliver_notification`: counts deliveries in flight; a body
    "fail" raises (an error of our own), "wait" blocks until `opened` is set."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.done: list[str] = []
        self.opened = asyncio.Event()

    async def __call__(self, body: str, **_: object) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if body.startswith("wait"):
                await self.opened.wait()
            else:
                await asyncio.sleep(0.05)
            if body.startswith("fail"):
                raise RuntimeError("task table down")
            self.done.append(body)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def consume(aws, stack, monkeypatch):
    """Runs a WebhookConsumer over the stack's webhooks queue with fake deliveries."""
    deliveries = Deliveries()
    monkeypatch.setattr(consumer_module, "deliver_notification", deliveries)
    async with aio_client("sqs", endpoint_url=aws.endpoint) as client:
        sqs = RecordingSqs(client)
        started: list[asyncio.Task[None]] = []

        def start(concurrency: int) -> None:
            consumer = WebhookConsumer(
                sqs,
                stack.webhook_queue_url,
                table=None,  # type: ignore[arg-type]  # used by deliver_notification only
                sender=None,  # type: ignore[arg-type]
                leases=LeaseKeeper(sqs, extension_s=60, interval_s=20),
                concurrency=concurrency,
                wait_s=0,
            )
            started.append(asyncio.create_task(consumer.run()))

        yield start, sqs, deliveries
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)


async def test_webhook_consumer_receives_a_batch_and_delivers_it_concurrently(aws, stack, consume):
    start, sqs, deliveries = consume
    # GIVEN ten notifications whose deliveries each wait until all ten have started
    send_notifications(aws, stack.webhook_queue_url, [f"wait-{n}" for n in range(10)])

    # WHEN the consumer runs with room for more than ten deliveries
    start(16)
    await eventually(lambda: deliveries.in_flight == 10, within=10)
    deliveries.opened.set()
    await eventually(lambda: len(deliveries.done) == 10, within=10)

    # THEN one receive asked for a full batch, all ten ran at once, and all were deleted
    assert sqs.receives[0][0] == 10
    assert sum(got for _, got in sqs.receives) == 10
    assert deliveries.peak == 10
    await eventually(lambda: messages_left(aws, stack.webhook_queue_url) == (0, 0), within=10)


async def test_webhook_consumer_takes_no_more_than_its_free_slots_and_keeps_failures(
    aws, stack, consume
):
    start, sqs, deliveries = consume
    # GIVEN seven notifications, one of whose delivery fails with an error of our own
    bodies = [f"ok-{n}" for n in range(6)] + ["fail-6"]
    send_notifications(aws, stack.webhook_queue_url, bodies)

    # WHEN the consumer runs with three delivery slots
    start(3)
    await eventually(lambda: len(deliveries.done) == 6, within=10)

    # THEN no receive asked for more than the free slots, at most three ran at once,
    # the six delivered were deleted and the failed one is kept (in flight) for a retry
    assert all(1 <= asked <= 3 for asked, _ in sqs.receives)
    assert deliveries.peak <= 3
    assert sorted(deliveries.done) == sorted(bodies[:6])
    await eventually(lambda: messages_left(aws, stack.webhook_queue_url) == (0, 1), within=10)
