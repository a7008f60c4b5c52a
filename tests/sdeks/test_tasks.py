"""The task table on the embedded DynamoDB (moto server, real aiobotocore)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

from sdeks import aws as sdeks_aws
from sdeks.aws import aio_client
from sdeks.callback import Callback, ErrorInfo, TaskStatus, Timings
from sdeks.envelope import Task
from sdeks.errors import TaskTableError
from sdeks.tasks import (
    TTL_ATTRIBUTE,
    CancelOutcome,
    TaskTable,
    WebhookStatus,
    status_index_update,
    table_schema,
)


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def atomic_dynamodb_writes(monkeypatch):
    """Give moto DynamoDB's per-item atomicity of conditional writes.

    moto's server handles each request on its own thread and checks a
    condition, then applies the write, with no lock between: two racing
    conditional writes to one item can both succeed (seen here about half the
    time). DynamoDB makes each conditional write atomic, and the claim relies on
    exactly that. Serializing moto's writes restores the guarantee, so these
    tests check our conditions, not moto's threading. The local stack needs the
    same (reported in issue 5).
    """
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "transact_write_items"):
        original = getattr(DynamoDBBackend, name)

        def locked(self, *args, _original=original, **kwargs):
            with lock:
                return _original(self, *args, **kwargs)

        monkeypatch.setattr(DynamoDBBackend, name, locked)


def create_task_table(dynamodb) -> str:
    """A fresh task table as the CDK app declares it: GSI and TTL included."""
    name = f"tasks-{uuid.uuid4().hex[:10]}"
    dynamodb.create_table(**table_schema(name))
    dynamodb.update_time_to_live(
        TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
    )
    return name


@pytest.fixture(scope="module")
def dynamodb(moto_endpoint):
    """One boto3 client for the module: building clients is most of a test's setup."""
    return sdeks_aws.client("dynamodb", endpoint_url=moto_endpoint)


@pytest.fixture
def table_name(dynamodb) -> str:
    return create_task_table(dynamodb)


@pytest.fixture
async def ddb(moto_endpoint):
    async with aio_client("dynamodb", endpoint_url=moto_endpoint) as client:
        yield client


@pytest.fixture
def table(ddb, table_name) -> TaskTable:
    return TaskTable(ddb, table_name, ttl_s=3600)


def make_task(task_id: str = "t-1", **metadata) -> Task:
    fields = {
        "id": task_id,
        "runtime": "sdruntime",
        "tasktype": "text-to-image",
        "prefix": "output",
        "context": {"user": "u1"},
        "content": {"prompt": "cat", "alwayson_scripts": {"sd_model_checkpoint": "tiny"}},
    }
    fields.update(metadata)
    return Task.model_validate(fields)


def finished(task_id: str = "t-1", status: TaskStatus = TaskStatus.SUCCEEDED) -> Callback:
    ok = status is TaskStatus.SUCCEEDED
    return Callback(
        id=task_id,
        runtime="sdruntime",
        tasktype="text-to-image",
        status=status,
        result=ok,
        output_location="s3://b/output/t-1",
        image_url=["s3://b/output/t-1/t-1-1.png"] if ok else [],
        output_url="s3://b/output/t-1/t-1.json",
        seeds=[42] if ok else [],
        error=None if ok else ErrorInfo(code="out_of_memory", message="CUDA out of memory"),
        timings=Timings(queued_ms=5, inference_ms=100, total_ms=120),
    )


async def test_record_queued_creates_item_with_fields_and_ttl(dynamodb, ddb, table_name):
    clock = FakeClock()
    table = TaskTable(ddb, table_name, ttl_s=600, clock=clock)
    task = make_task(webhook="https://example.com/hook")

    record = await table.record_queued(task, published_at=clock.now - 2.5)

    assert record.status is TaskStatus.QUEUED
    assert record.attempts == 1
    assert (record.runtime, record.tasktype, record.model) == ("sdruntime", "text-to-image", "tiny")
    assert record.webhook == "https://example.com/hook"
    assert record.context == {"user": "u1"}
    assert record.received_at == int(clock.now * 1000)
    assert record.published_at == int((clock.now - 2.5) * 1000)
    assert record.expires_at == int(clock.now) + 600
    ttl = dynamodb.describe_time_to_live(TableName=table_name)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == TTL_ATTRIBUTE
    raw = dynamodb.get_item(TableName=table_name, Key={"id": {"S": task.id}})["Item"]
    assert raw[TTL_ATTRIBUTE] == {"N": str(int(clock.now) + 600)}  # epoch seconds, as TTL wants


async def test_status_transitions_and_progress(table):
    task = make_task()
    await table.record_queued(task)

    assert await table.mark_running(task.id, pod="pod-a", total_steps=20)
    running = await table.get(task.id)
    assert running.status is TaskStatus.RUNNING
    assert (running.pod, running.progress_done, running.progress_total) == ("pod-a", 0, 20)
    assert running.started_at is not None

    assert await table.update_progress(task.id, 7, 20)
    assert (await table.get(task.id)).progress_done == 7

    assert await table.claim_terminal(finished())
    done = await table.get(task.id)
    assert done.status is TaskStatus.SUCCEEDED
    assert done.result is True
    assert done.image_url == ["s3://b/output/t-1/t-1-1.png"]
    assert done.seeds == [42]
    assert done.timings.inference_ms == 100
    assert done.finished_at >= done.started_at
    assert done.execution_ms is not None and done.queued_ms is not None
    assert done.terminal_callback() == finished()
    assert done.callback_published is False

    # Late writers cannot move a finished task.
    assert not await table.update_progress(task.id, 8, 20)
    assert not await table.mark_running(task.id, pod="pod-b")
    assert (await table.get(task.id)).status is TaskStatus.SUCCEEDED


async def test_record_queued_redelivery_counts_attempts_without_regressing(table):
    task = make_task()
    await table.record_queued(task)
    await table.mark_running(task.id, pod="pod-a")

    again = await table.record_queued(task)

    assert again.status is TaskStatus.RUNNING
    assert again.attempts == 2


async def test_record_queued_of_finished_task_returns_it_untouched(table):
    task = make_task()
    await table.record_queued(task)
    await table.claim_terminal(finished())
    before = await table.get(task.id)

    again = await table.record_queued(task, published_at=time.time())

    assert again.status is TaskStatus.SUCCEEDED
    # Same attempts, same expiry: the window is not extended. Only the republish is
    # counted, so `sdeks status` can say why nothing happened.
    assert again.model_copy(update={"republished": 0, "republished_at": None}) == before
    assert again.republished == 1 and again.republished_at is not None


async def test_claim_terminal_race_has_exactly_one_winner(ddb, table_name):
    # Two pods (or a pod and a dispatcher) with their own table objects.
    first, second = TaskTable(ddb, table_name), TaskTable(ddb, table_name)
    task = make_task()
    await first.record_queued(task)
    await first.mark_running(task.id)

    statuses = [TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.FAILED, TaskStatus.SUCCEEDED]
    tables = [first, second, first, second]
    results = await asyncio.gather(
        *(t.claim_terminal(finished(status=s)) for t, s in zip(tables, statuses, strict=True))
    )

    assert results.count(True) == 1
    # the stored status is the one claim that won
    assert (await first.get(task.id)).status is statuses[results.index(True)]


async def test_claim_terminal_of_unknown_id_creates_it(table):
    # A dispatcher failing an envelope it could read an id from, before record_queued.
    assert await table.claim_terminal(finished("never-queued", TaskStatus.FAILED))
    record = await table.get("never-queued")
    assert record.status is TaskStatus.FAILED
    assert record.error == ErrorInfo(code="out_of_memory", message="CUDA out of memory")
    assert record.received_at is not None  # so it shows in list_recent


async def test_claim_terminal_refuses_non_terminal_and_anonymous(table):
    with pytest.raises(ValueError, match="terminal"):
        await table.claim_terminal(Callback(id="x", status=TaskStatus.RUNNING))
    with pytest.raises(ValueError, match="id"):
        await table.claim_terminal(Callback(id=None, status=TaskStatus.FAILED))


async def test_cancel_while_queued_ends_it_at_once(table):
    task = make_task()
    await table.record_queued(task)

    outcome, record = await table.request_cancel(task.id)

    assert outcome is CancelOutcome.CANCELLED
    assert record.status is TaskStatus.CANCELLED
    callback = record.terminal_callback()
    assert callback.status is TaskStatus.CANCELLED
    assert callback.error.code == "cancelled"
    assert callback.context == {"user": "u1"}
    # Nobody renders or reports it afterwards.
    assert not await table.mark_running(task.id, pod="pod-a")
    assert (await table.record_queued(task)).status is TaskStatus.CANCELLED
    assert not await table.claim_terminal(finished())
    assert (await table.request_cancel(task.id))[0] is CancelOutcome.ALREADY_FINISHED


async def test_cancel_while_running_sets_flag_then_pod_claims_cancelled(table):
    task = make_task()
    await table.record_queued(task)
    await table.mark_running(task.id, pod="pod-a", total_steps=20)

    outcome, record = await table.request_cancel(task.id)

    assert outcome is CancelOutcome.CANCEL_REQUESTED
    assert record.status is TaskStatus.RUNNING and record.cancel_requested
    # The pod's next progress write tells it to stop; a restart would not start it.
    assert not await table.update_progress(task.id, 3, 20)
    assert not await table.mark_running(task.id, pod="pod-b")
    stopped = finished(status=TaskStatus.CANCELLED)
    assert await table.claim_terminal(stopped)
    assert (await table.get(task.id)).status is TaskStatus.CANCELLED


async def test_a_later_attempt_fences_the_earlier_one_out(table):
    # GIVEN a task attempt a started, then attempt b (a's dispatcher died, the
    # message came back and another pod started it)
    task = make_task("fence-1")
    await table.record_queued(task)
    assert await table.mark_running(task.id, pod="pod-a", run="a")
    assert await table.may_write_outputs(task.id, run="a")
    assert await table.mark_running(task.id, pod="pod-b", run="b")
    # THEN a may no longer record progress, write outputs or claim the end ...
    assert not await table.update_progress(task.id, 1, 2, run="a")
    assert not await table.may_write_outputs(task.id, run="a")
    assert not await table.claim_terminal(finished(task.id), run="a")
    # ... b may, and once b ended nobody may write outputs any more
    assert await table.update_progress(task.id, 1, 2, run="b")
    assert await table.may_write_outputs(task.id, run="b")
    assert await table.claim_terminal(finished(task.id), run="b")
    assert not await table.may_write_outputs(task.id, run="b")
    record = await table.get(task.id)
    assert record is not None and record.run == "b" and record.pod == "pod-b"


async def test_a_cancel_requested_attempt_still_writes_its_cancelled_outputs(table):
    task = make_task("fence-2")
    await table.record_queued(task)
    assert await table.mark_running(task.id, run="a")
    await table.request_cancel(task.id)
    assert await table.may_write_outputs(task.id, run="a")
    assert await table.claim_terminal(finished(task.id, TaskStatus.CANCELLED), run="a")


async def test_cancel_unknown_id_is_not_found(table):
    assert await table.request_cancel("nope") == (CancelOutcome.NOT_FOUND, None)


async def test_remember_seed_keeps_the_first_attempts_seed(ddb, table_name, table):
    task = make_task()
    await table.record_queued(task)

    assert await table.remember_seed(task.id, 1234) == 1234
    # Second attempt, maybe another dispatcher, drew another random seed.
    assert await TaskTable(ddb, table_name).remember_seed(task.id, 999) == 1234
    assert (await table.get(task.id)).seed == 1234
    # No item (table write lost at receipt): the caller's own seed stands.
    assert await table.remember_seed("unknown", 77) == 77
    assert await table.get("unknown") is None


async def test_expired_record_is_forgotten_and_replaced(ddb, table_name):
    clock = FakeClock()
    table = TaskTable(ddb, table_name, ttl_s=10, clock=clock)
    task = make_task()
    await table.record_queued(task)
    await table.claim_terminal(finished())

    clock.now += 11  # past the idempotency window; DynamoDB has not deleted it yet
    assert await table.get(task.id) is None
    fresh = await table.record_queued(task)

    assert fresh.status is TaskStatus.QUEUED
    assert fresh.attempts == 1
    assert fresh.callback is None and fresh.image_url == []
    assert fresh.expires_at == int(clock.now) + 10


async def test_list_recent_newest_first_and_by_status(ddb, table_name):
    clock = FakeClock()
    table = TaskTable(ddb, table_name, clock=clock)
    for n in range(4):
        clock.now += 1
        await table.record_queued(make_task(f"l-{n}"))
    await table.claim_terminal(finished("l-1"))

    assert [r.id for r in await table.list_recent()] == ["l-3", "l-2", "l-1", "l-0"]
    assert [r.id for r in await table.list_recent(limit=2)] == ["l-3", "l-2"]
    assert [r.id for r in await table.list_recent("succeeded")] == ["l-1"]
    assert [r.id for r in await table.list_recent(TaskStatus.QUEUED, limit=1)] == ["l-3"]


async def test_count_queued_before_counts_same_runtime_only(ddb, table_name):
    clock = FakeClock()
    table = TaskTable(ddb, table_name, clock=clock)
    for n, runtime in enumerate(["sdruntime", "other", "sdruntime", "sdruntime"]):
        clock.now += 1
        await table.record_queued(make_task(f"q-{n}", runtime=runtime))
    await table.mark_running("q-0")

    assert await table.count_queued_before(await table.get("q-3")) == 1  # q-2
    assert await table.count_queued_before(await table.get("q-2")) == 0


async def test_unconfirmed_claim_is_handed_out_for_republish_once(ddb, table_name):
    clock = FakeClock()
    table = TaskTable(ddb, table_name, clock=clock)
    await table.record_queued(make_task())
    await table.claim_terminal(finished())  # the winner then crashed before publishing

    clock.now += 30
    assert await table.claim_republish("t-1", stale_after_s=60) is None  # maybe still publishing
    clock.now += 40
    assert await table.claim_republish("t-1", stale_after_s=60) == finished()
    clock.now += 1
    assert await table.claim_republish("t-1", stale_after_s=60) is None  # taken just now
    await table.mark_published("t-1")
    clock.now += 600
    assert await table.claim_republish("t-1", stale_after_s=60) is None


async def test_record_webhook_outcome(table):
    await table.record_queued(make_task())
    await table.record_webhook_outcome(
        "t-1", status=WebhookStatus.FAILED, attempts=4, http_status=500, error="HTTP 500"
    )
    record = await table.get("t-1")
    assert record.webhook_status is WebhookStatus.FAILED
    assert (record.webhook_attempts, record.webhook_http_status) == (4, 500)
    assert record.webhook_error == "HTTP 500"


async def test_client_errors_become_task_table_errors(ddb, aws, stack):
    missing = TaskTable(ddb, "no-such-table")
    with pytest.raises(TaskTableError, match="ResourceNotFound"):
        await missing.get("x")
    with pytest.raises(TaskTableError, match="ResourceNotFound"):
        await missing.mark_running("x")
    # A table created before the GSI existed: list_recent says what is missing,
    # and `status_index_update` adds it.
    bare = f"bare-{uuid.uuid4().hex[:8]}"
    aws.dynamodb.create_table(
        TableName=bare,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    without_index = TaskTable(ddb, bare)
    with pytest.raises(TaskTableError):
        await without_index.list_recent()
    aws.dynamodb.update_table(TableName=bare, **status_index_update())
    assert await without_index.list_recent() == []


def put_partial(dynamodb, table_name: str, task_id: str, **attrs) -> None:
    """An item without a status, as a hand edit, another writer or an emulator caught
    mid-write can leave: `TaskRecord` cannot hold it."""
    item = {"id": {"S": task_id}, **attrs}
    dynamodb.put_item(TableName=table_name, Item=item)


async def test_partial_item_is_absent_to_readers_and_untouched_by_updates(
    table, dynamodb, table_name
):
    put_partial(dynamodb, table_name, "p-1")
    assert await table.get("p-1") is None
    assert await table.get("p-1", live=False) is None
    assert await table.request_cancel("p-1") == (CancelOutcome.NOT_FOUND, None)
    assert await table.update_progress("p-1", 1, 4) is False
    await table.mark_published("p-1")
    await table.record_webhook_outcome("p-1", status=WebhookStatus.DELIVERED, attempts=1)
    assert await table.remember_seed("p-1", 7) == 7
    assert await table.claim_republish("p-1", stale_after_s=0) is None
    assert await table.list_recent() == []
    # none of the writes that must not create a record added anything to it
    item = dynamodb.get_item(TableName=table_name, Key={"id": {"S": "p-1"}})["Item"]
    assert item == {"id": {"S": "p-1"}}


async def test_writes_that_create_a_record_complete_a_partial_item(table, dynamodb, table_name):
    put_partial(dynamodb, table_name, "p-q")
    queued = await table.record_queued(make_task("p-q"))
    assert (queued.status, queued.attempts, queued.runtime) == (TaskStatus.QUEUED, 1, "sdruntime")
    assert (await table.get("p-q")).status is TaskStatus.QUEUED

    put_partial(dynamodb, table_name, "p-r")
    assert await table.mark_running("p-r", pod="pod-1", total_steps=4) is True
    assert await table.update_progress("p-r", 1, 4) is True
    assert (await table.get("p-r")).status is TaskStatus.RUNNING

    put_partial(dynamodb, table_name, "p-t")
    assert await table.claim_terminal(finished("p-t"), new_only=True) is True
    done = await table.get("p-t")
    assert done.status is TaskStatus.SUCCEEDED
    assert done.terminal_callback() == finished("p-t")


async def test_listing_skips_an_item_that_is_not_a_record(table, dynamodb, table_name):
    await table.record_queued(make_task("good"))
    # indexed (status and received_at are there) but `attempts` is not a number
    put_partial(
        dynamodb,
        table_name,
        "bad",
        status={"S": "queued"},
        received_at={"N": "1"},
        attempts={"S": "many"},
    )
    assert [r.id for r in await table.list_recent()] == ["good"]
    assert [r.id for r in await table.list_recent(TaskStatus.QUEUED)] == ["good"]
    assert await table.get("bad") is None


def test_embedded_dynamodb_never_shows_an_update_half_applied(monkeypatch, dynamodb, table_name):
    """moto's UpdateItem of a new key stores the bare key, then applies the expression:
    a read served in between saw ``{"id"}`` alone (a flaky e2e cancel test). The local
    stack serializes reads with writes (`make_moto_dynamodb_atomic`), so a read made
    while the expression is being applied waits for the whole item."""
    from moto.dynamodb import models

    seen: list[dict] = []
    readers: list[threading.Thread] = []
    real = models.UpdateExpressionExecutor

    def read_now() -> None:
        answer = dynamodb.get_item(TableName=table_name, Key={"id": {"S": "half"}})
        seen.append(answer.get("Item", {}))

    class ReadMidUpdate(real):
        def execute(self, *args, **kwargs):
            if not readers:  # one read, at the first point the bare key is stored
                readers.append(threading.Thread(target=read_now))
                readers[0].start()
                # Long enough for an unserialized read to answer; a serialized one waits.
                readers[0].join(timeout=1.0)
            return super().execute(*args, **kwargs)

    monkeypatch.setattr(models, "UpdateExpressionExecutor", ReadMidUpdate)
    dynamodb.update_item(
        TableName=table_name,
        Key={"id": {"S": "half"}},
        UpdateExpression="SET #s = :s",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":s": {"S": "queued"}},
    )
    monkeypatch.setattr(models, "UpdateExpressionExecutor", real)
    readers[0].join(timeout=10)  # the serialized read answers once the update is done
    assert seen == [{"id": {"S": "half"}, "status": {"S": "queued"}}]
