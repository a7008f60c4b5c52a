"""Signed webhooks: a receiver on 127.0.0.1 verifies every POST; retries, give-up,
refusal of private addresses, and the durable path through the callback topic."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from sdeks.aws import aio_client
from sdeks.callback import Callback, TaskStatus
from sdeks.errors import LinkForbiddenError
from sdeks.lifecycle import Reporter
from sdeks.tasks import TaskTable, WebhookStatus
from sdeks.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    RetryPolicy,
    WebhookSender,
    compute_signature,
    deliver_notification,
    signature_headers,
    verify_signature,
)
from tests.helpers import serve_app
from tests.sdeks.test_tasks import (  # noqa: F401 (an autouse fixture)
    atomic_dynamodb_writes,
    create_task_table,
    finished,
    make_task,
)

SECRET = "s3cret-for-tests"
FAST = RetryPolicy(retries=3, base_delay_s=0.01, max_delay_s=0.05, timeout_s=5.0)


async def loopback_only(url: str) -> None:
    """Stands in for the dispatcher's SSRF guard: only 127.0.0.1 may be reached."""
    if urlsplit(url).hostname != "127.0.0.1":
        raise LinkForbiddenError(f"webhook address not allowed: {url}")


class Receiver:
    """An HTTP receiver that verifies signatures and answers from a script."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.default = 200
        self.requests: list[SimpleNamespace] = []
        self.arrived = asyncio.Event()
        self.hold: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            SimpleNamespace(
                body=body,
                headers=dict(request.headers),
                verified=verify_signature(SECRET, request.headers, body),
            )
        )
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        status = self.answers.pop(0) if self.answers else self.default
        return web.Response(status=status, text="ok")


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    async with serve_app(app) as base:
        rec.url = f"{base}/hook"
        yield rec
        if rec.hold is not None:
            rec.hold.set()


class RequestCounter:
    """Counts requests the client session starts, to prove a refusal made none."""

    def __init__(self) -> None:
        self.started = 0
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._on_start)

    async def _on_start(self, *_args) -> None:
        self.started += 1


@pytest.fixture
async def session():
    counter = RequestCounter()
    async with aiohttp.ClientSession(trace_configs=[counter.config]) as http:
        http.counter = counter
        yield http


@pytest.fixture
async def table(moto_endpoint, aws):
    async with aio_client("dynamodb", endpoint_url=moto_endpoint) as ddb:
        yield TaskTable(ddb, create_task_table(aws.dynamodb))


def callback(task_id: str = "t-1") -> Callback:
    return finished(task_id)


# --- signing ------------------------------------------------------------------


def test_signature_verifies_and_rejects_tampering_and_replay():
    body = b'{"id":"t-1","status":"succeeded"}'
    headers = signature_headers(SECRET, body, timestamp=1_800_000_000)
    assert headers[SIGNATURE_HEADER] == "v1=" + compute_signature(SECRET, 1_800_000_000, body)

    assert verify_signature(SECRET, headers, body, now=1_800_000_010)
    lowercase = {k.lower(): v for k, v in headers.items()}
    assert verify_signature(SECRET, lowercase, body, now=1_800_000_010)
    assert not verify_signature(SECRET, headers, body + b" ", now=1_800_000_010)
    assert not verify_signature("other", headers, body, now=1_800_000_010)
    assert not verify_signature(SECRET, headers, body, now=1_800_000_000 + 301)  # replayed
    moved = {**headers, TIMESTAMP_HEADER: "1800000001"}  # timestamp is signed too
    assert not verify_signature(SECRET, moved, body, now=1_800_000_010)
    assert not verify_signature(SECRET, {}, body)


def test_signature_accepts_any_of_several_during_rotation():
    body = b"{}"
    old = compute_signature("old", 100, body)
    new = compute_signature("new", 100, body)
    headers = {TIMESTAMP_HEADER: "100", SIGNATURE_HEADER: f"v1={old}, v1={new}"}
    assert verify_signature("old", headers, body, now=100)
    assert verify_signature("new", headers, body, now=100)


def test_sender_requires_a_secret():
    with pytest.raises(ValueError, match="secret"):
        WebhookSender(None, secret="", guard=loopback_only)  # type: ignore[arg-type]


# --- delivery -------------------------------------------------------------------


async def test_deliver_signed_callback_verified_by_receiver(receiver, session, table):
    await table.record_queued(make_task(webhook=receiver.url))
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, table=table, retry=FAST)

    outcome = await sender.deliver(receiver.url, callback())

    assert (outcome.status, outcome.attempts, outcome.http_status) == (
        WebhookStatus.DELIVERED,
        1,
        200,
    )
    [request] = receiver.requests
    assert request.verified
    assert Callback.model_validate_json(request.body) == callback()
    assert request.headers["X-Sdeks-Task-Id"] == "t-1"
    assert request.headers["Content-Type"] == "application/json"
    record = await table.get("t-1")
    assert (record.webhook_status, record.webhook_attempts) == (WebhookStatus.DELIVERED, 1)


async def test_deliver_retries_after_5xx_then_succeeds(receiver, session, table):
    await table.record_queued(make_task())
    receiver.answers = [500, 503, 200]
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, table=table, retry=FAST)

    outcome = await sender.deliver(receiver.url, callback())

    assert (outcome.status, outcome.attempts) == (WebhookStatus.DELIVERED, 3)
    assert all(r.verified for r in receiver.requests)
    assert [r.headers["X-Sdeks-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
    assert (await table.get("t-1")).webhook_attempts == 3


async def test_deliver_retries_429(receiver, session):
    receiver.answers = [429, 200]
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, retry=FAST)
    outcome = await sender.deliver(receiver.url, callback())
    assert (outcome.status, outcome.attempts) == (WebhookStatus.DELIVERED, 2)


async def test_deliver_gives_up_after_retries_and_records_failure(receiver, session, table):
    await table.record_queued(make_task())
    receiver.default = 500
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, table=table, retry=FAST)

    outcome = await sender.deliver(receiver.url, callback())

    assert (outcome.status, outcome.attempts, outcome.http_status) == (
        WebhookStatus.FAILED,
        1 + FAST.retries,
        500,
    )
    assert len(receiver.requests) == 1 + FAST.retries
    record = await table.get("t-1")
    assert (record.webhook_status, record.webhook_attempts) == (WebhookStatus.FAILED, 4)
    assert (record.webhook_http_status, record.webhook_error) == (500, "HTTP 500")


async def test_deliver_does_not_retry_other_4xx(receiver, session):
    receiver.default = 404
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, retry=FAST)
    outcome = await sender.deliver(receiver.url, callback())
    assert (outcome.status, outcome.attempts, outcome.http_status) == (
        WebhookStatus.FAILED,
        1,
        404,
    )


async def test_deliver_retries_connection_errors(session):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, retry=FAST)

    outcome = await sender.deliver(f"http://127.0.0.1:{port}/hook", callback())

    assert (outcome.status, outcome.attempts, outcome.http_status) == (
        WebhookStatus.FAILED,
        4,
        None,
    )
    assert "Connect" in outcome.error


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/"]
)
async def test_private_address_is_refused_before_connecting(url, session, table):
    await table.record_queued(make_task())
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, table=table, retry=FAST)

    outcome = await sender.deliver(url, callback())

    assert (outcome.status, outcome.attempts) == (WebhookStatus.REFUSED, 0)
    assert session.counter.started == 0  # no request began (pytest-socket is the backstop)
    assert (await table.get("t-1")).webhook_status is WebhookStatus.REFUSED


# --- the durable path: callback topic -> webhooks queue -> dispatcher ----------


async def test_webhooks_queue_delivers_terminal_callbacks_once(
    aws, moto_endpoint, stack, receiver, session, table
):
    # GIVEN the stack's webhooks queue, subscribed to the callback topic for terminal statuses
    topic, queue = stack.callback_topic_arn, stack.webhook_queue_url
    task = make_task(webhook=receiver.url)
    await table.record_queued(task)
    sender = WebhookSender(session, secret=SECRET, guard=loopback_only, table=table, retry=FAST)

    # WHEN the pod reports running, then success
    async with aio_client("sns", endpoint_url=moto_endpoint) as sns:
        reporter = Reporter(sns, topic, table=table, publish_running=True)
        await reporter.running(task, pod="pod-a")
        assert await reporter.finish(callback())

    # THEN the queue holds only the terminal callback, and delivering it (twice,
    # as an SQS redelivery would) POSTs once
    messages = aws.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    assert len(messages) == 1
    outcome = await deliver_notification(messages[0]["Body"], table=table, sender=sender)
    assert outcome.status is WebhookStatus.DELIVERED
    assert await deliver_notification(messages[0]["Body"], table=table, sender=sender) is None
    [request] = receiver.requests
    assert request.verified
    assert Callback.model_validate_json(request.body).status is TaskStatus.SUCCEEDED
