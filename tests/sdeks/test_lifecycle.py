"""Reporter: claim-then-publish on the embedded stack, callbacks read back from an
SQS queue subscribed to the callback topic."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from sdeks import aws as sdeks_aws
from sdeks.aws import aio_client
from sdeks.callback import Callback, ErrorInfo, TaskStatus
from sdeks.client import CallbackListener
from sdeks.lifecycle import Reporter, describe, estimate_eta_s
from sdeks.tasks import CancelOutcome, TaskRecord, TaskTable
from tests.helpers import drain_callbacks
from tests.sdeks.test_tasks import (  # noqa: F401 (an autouse fixture)
    FakeClock,
    atomic_dynamodb_writes,
    create_task_table,
    finished,
    make_task,
)


@pytest.fixture(scope="module")
def aws(moto_endpoint):
    """boto3 clients built once: building them is most of a test's setup time."""
    return SimpleNamespace(
        **{n: sdeks_aws.client(n, endpoint_url=moto_endpoint) for n in ("sns", "sqs", "dynamodb")}
    )


@pytest.fixture
def stack(aws):
    """The part of the stack a reporter needs: a callback topic of its own."""
    name = f"cb-{uuid.uuid4().hex[:10]}"
    return SimpleNamespace(callback_topic_arn=aws.sns.create_topic(Name=name)["TopicArn"])


@pytest.fixture
def callbacks_queue(aws, stack) -> Iterator[CallbackListener]:
    """Everything published to the callback topic lands here."""
    with CallbackListener(aws.sns, aws.sqs, stack.callback_topic_arn) as listener:
        yield listener


@pytest.fixture
async def clients(moto_endpoint):
    async with (
        aio_client("sns", endpoint_url=moto_endpoint) as sns,
        aio_client("dynamodb", endpoint_url=moto_endpoint) as ddb,
    ):
        yield sns, ddb


@pytest.fixture
def table_name(aws) -> str:
    return create_task_table(aws.dynamodb)


@pytest.fixture
def table(clients, table_name) -> TaskTable:
    return TaskTable(clients[1], table_name)


@pytest.fixture
def reporter(clients, stack, table) -> Reporter:
    return Reporter(clients[0], stack.callback_topic_arn, table=table)


async def test_finish_race_publishes_exactly_one_callback(
    clients, stack, table_name, callbacks_queue
):
    # GIVEN two services with their own reporters racing to end the same task
    sns, ddb = clients
    pod = Reporter(sns, stack.callback_topic_arn, table=TaskTable(ddb, table_name))
    dispatcher = Reporter(sns, stack.callback_topic_arn, table=TaskTable(ddb, table_name))
    task = make_task()
    await pod.table.record_queued(task)
    await pod.running(task, pod="pod-a")

    # WHEN both finish at once
    results = await asyncio.gather(
        pod.finish(finished(status=TaskStatus.SUCCEEDED)),
        dispatcher.finish(finished(status=TaskStatus.FAILED)),
    )

    # THEN exactly one callback is on the topic: the winner's
    assert sorted(results) == [False, True]
    callbacks = drain_callbacks(callbacks_queue)
    assert [c.status for c in callbacks] == [
        [TaskStatus.SUCCEEDED, TaskStatus.FAILED][results.index(True)]
    ]
    # and a late third attempt (a redelivery) publishes nothing
    assert not await pod.finish(finished(status=TaskStatus.FAILED))
    assert drain_callbacks(callbacks_queue) == []
    assert (await pod.table.get(task.id)).callback_published is True


async def test_finish_without_table_publishes_every_time(clients, stack, callbacks_queue):
    # The weaker guarantee without a table: at-least-once.
    reporter = Reporter(clients[0], stack.callback_topic_arn)
    assert await reporter.finish(finished())
    assert await reporter.finish(finished())
    assert len(drain_callbacks(callbacks_queue)) == 2


async def test_finish_refuses_a_running_status(reporter):
    with pytest.raises(ValueError, match="terminal"):
        await reporter.finish(Callback(id="t-1", status=TaskStatus.RUNNING))


async def test_running_callback_only_when_switched_on(clients, stack, table, callbacks_queue):
    quiet = Reporter(clients[0], stack.callback_topic_arn, table=table)
    chatty = Reporter(clients[0], stack.callback_topic_arn, table=table, publish_running=True)
    first, second = make_task("r-1"), make_task("r-2")
    await table.record_queued(first)
    await table.record_queued(second)

    assert await quiet.running(first, pod="pod-a", total_steps=10)
    assert await chatty.running(second, pod="pod-a", total_steps=10)

    callbacks = drain_callbacks(callbacks_queue)
    assert [(c.id, c.status) for c in callbacks] == [("r-2", TaskStatus.RUNNING)]
    assert callbacks[0].context == {"user": "u1"}
    assert (await table.get("r-1")).status is TaskStatus.RUNNING


async def test_cancel_while_queued_publishes_one_cancelled_callback(
    reporter, table, callbacks_queue
):
    task = make_task()
    await table.record_queued(task)

    assert await reporter.cancel(task.id) is CancelOutcome.CANCELLED

    callbacks = drain_callbacks(callbacks_queue)
    assert [(c.id, c.status, c.error.code) for c in callbacks] == [
        ("t-1", TaskStatus.CANCELLED, "cancelled")
    ]
    assert callbacks[0].context == {"user": "u1"}
    # The dispatcher then receives the message: the pod refuses to start it,
    # and a failure report for it publishes nothing.
    assert not await reporter.running(task, pod="pod-a")
    assert not await reporter.finish(finished(status=TaskStatus.FAILED))
    assert await reporter.cancel(task.id) is CancelOutcome.ALREADY_FINISHED
    assert drain_callbacks(callbacks_queue) == []


async def test_cancel_while_running_stops_between_steps(reporter, table, callbacks_queue):
    task = make_task()
    await table.record_queued(task)
    assert await reporter.running(task, pod="pod-a", total_steps=20)
    assert await reporter.progress(task.id, 1, 20)

    assert await reporter.cancel(task.id) is CancelOutcome.CANCEL_REQUESTED
    assert drain_callbacks(callbacks_queue) == []  # the pod reports, not the canceller

    reporter._last_progress.clear()  # the next step is past the throttle interval
    assert not await reporter.progress(task.id, 2, 20)  # the pod's step callback: stop
    assert await reporter.finish(finished(status=TaskStatus.CANCELLED))
    assert [c.status for c in drain_callbacks(callbacks_queue)] == [TaskStatus.CANCELLED]


async def test_admit_drops_finished_and_recovers_unpublished(reporter, table, callbacks_queue):
    task = make_task()
    assert await reporter.admit(task, published_at=1_800_000_000.0)  # first delivery
    assert await reporter.admit(task)  # redelivery of an unfinished task: dispatch again
    assert (await table.get(task.id)).attempts == 2

    await table.claim_terminal(finished())  # its winner died before publishing
    reporter.republish_after_s = 0
    assert not await reporter.admit(task)  # republish of a finished id: no second render
    assert not await reporter.admit(task)
    assert [c.status for c in drain_callbacks(callbacks_queue)] == [TaskStatus.SUCCEEDED]


async def test_admit_ends_a_cancel_requested_task_whose_pod_died(reporter, table, callbacks_queue):
    task = make_task()
    assert await reporter.admit(task)
    assert await reporter.running(task, pod="pod-a")
    await reporter.cancel(task.id)  # flag set; then pod-a dies and SQS redelivers

    assert not await reporter.admit(task)

    [callback] = drain_callbacks(callbacks_queue)
    assert (callback.status, callback.error.code) == (TaskStatus.CANCELLED, "cancelled")


async def test_pin_seed_keeps_the_first_attempts_draw(reporter, table):
    task = make_task(content={"prompt": "cat", "seed": -1})
    await reporter.admit(task)

    first = await reporter.pin_seed(task)
    second = await reporter.pin_seed(task)

    assert first.content["seed"] == second.content["seed"] >= 0
    assert task.content["seed"] == -1  # the caller's task is not mutated
    fixed = make_task("fixed", content={"seed": 7})
    assert await reporter.pin_seed(fixed) is fixed
    absent = make_task("absent", content={"prompt": "cat"})
    await reporter.admit(absent)
    assert (await reporter.pin_seed(absent)).content["seed"] == (await table.get("absent")).seed


async def test_progress_writes_are_throttled(clients, stack, table):
    clock = FakeClock(100.0)
    reporter = Reporter(
        clients[0], stack.callback_topic_arn, table=table, progress_interval_s=1.0, monotonic=clock
    )
    task = make_task()
    await table.record_queued(task)
    await reporter.running(task, total_steps=10)

    assert await reporter.progress(task.id, 1, 10)
    clock.now += 0.5
    assert await reporter.progress(task.id, 2, 10)  # skipped: within the interval
    assert (await table.get(task.id)).progress_done == 1
    clock.now += 0.6
    assert await reporter.progress(task.id, 3, 10)
    assert (await table.get(task.id)).progress_done == 3
    clock.now += 0.1
    assert await reporter.progress(task.id, 10, 10)  # the last step is always written
    assert (await table.get(task.id)).progress_done == 10


async def test_recover_republishes_a_claim_whose_publish_was_lost(reporter, table, callbacks_queue):
    await table.record_queued(make_task())
    await table.claim_terminal(finished())  # the winner crashed before publishing

    assert await reporter.recover("t-1", stale_after_s=0)
    assert not await reporter.recover("t-1", stale_after_s=0)  # confirmed now

    assert [c.status for c in drain_callbacks(callbacks_queue)] == [TaskStatus.SUCCEEDED]


def refused(task_id: str = "twin") -> Callback:
    error = ErrorInfo(code="invalid_envelope", message="task.metadata.tasktype: not a tasktype")
    return Callback(id=task_id, status=TaskStatus.FAILED, error=error)


async def test_refusal_copies_of_one_message_publish_one_callback(reporter, callbacks_queue):
    """SNS fan-out puts one refused message in two queues; handled at once, both copies
    refuse it under the same message id. The copy that loses the claim used to take the
    winner's unconfirmed claim for its own lost publish and publish it a second time."""
    copies = ("sns:m-1@sdruntime", "sns:m-1@catch-all")
    published = await asyncio.gather(
        *(reporter.refuse(refused(), message_id="m-1", delivery=d) for d in copies)
    )

    assert sorted(published) == [False, True]
    [callback] = drain_callbacks(callbacks_queue)
    assert (callback.id, callback.message_id, callback.error.code) == (
        "twin",
        "m-1",
        "invalid_envelope",
    )


async def test_refusal_claimed_by_another_copy_waits_for_that_copy(
    reporter, table, callbacks_queue
):
    # Copy A claimed the id and has not published yet (in flight, or it died).
    claim = refused().model_copy(update={"message_id": "m-1"})
    assert await table.claim_terminal(claim, new_only=True, delivery="sns:m-1@sdruntime")

    # Copy B publishes nothing: A's SQS message is kept until A has published.
    assert not await reporter.refuse(refused(), message_id="m-1", delivery="sns:m-1@catch-all")
    assert drain_callbacks(callbacks_queue) == []
    # A's redelivery (its publish was lost) publishes the stored callback, once.
    assert await reporter.refuse(refused(), message_id="m-1", delivery="sns:m-1@sdruntime")
    assert not await reporter.refuse(refused(), message_id="m-1", delivery="sns:m-1@sdruntime")
    assert not await reporter.refuse(refused(), message_id="m-1", delivery="sns:m-1@catch-all")
    # Another message naming the id goes out without it.
    assert await reporter.refuse(refused(), message_id="m-2", delivery="sns:m-2@sdruntime")

    first, second = sorted(drain_callbacks(callbacks_queue), key=lambda c: c.message_id or "")
    assert (first.id, first.message_id) == ("twin", "m-1")
    assert (second.id, second.named_id, second.message_id) == (None, "twin", "m-2")


async def test_describe_gives_queue_position_and_eta(clients, table_name):
    clock = FakeClock()
    table = TaskTable(clients[1], table_name, clock=clock)
    # One finished task of the runtime took 4 s.
    await table.record_queued(make_task("done"))
    await table.mark_running("done")
    clock.now += 4
    await table.claim_terminal(finished("done"))
    for n in range(3):
        clock.now += 1
        await table.record_queued(make_task(f"w-{n}"))

    view = await describe(table, "w-2")

    assert view.record.status is TaskStatus.QUEUED
    assert view.queue_position == 2
    assert view.eta_s == pytest.approx((2 + 1) * 4.0)
    assert (await describe(table, "w-2", workers=2)).eta_s == pytest.approx((1 + 1) * 4.0)
    finished_view = await describe(table, "done")
    assert (finished_view.queue_position, finished_view.eta_s) == (None, 0.0)
    assert await describe(table, "unknown") is None


def test_estimate_eta_running_uses_time_per_step():
    record = TaskRecord(
        id="x", status=TaskStatus.RUNNING, started_at=10_000, progress_done=5, progress_total=20
    )
    # 5 steps in 2 s: 15 steps left at 0.4 s each.
    assert estimate_eta_s(record, ahead=0, mean_ms=None, workers=1, now_ms=12_000) == 6.0
    before_first_step = record.model_copy(update={"progress_done": 0})
    assert estimate_eta_s(before_first_step, ahead=0, mean_ms=5000, workers=1, now_ms=12_000) == 3
    assert estimate_eta_s(before_first_step, ahead=0, mean_ms=None, workers=1, now_ms=0) is None


def test_estimate_eta_queued_without_history_is_unknown():
    record = TaskRecord(id="x", status=TaskStatus.QUEUED, received_at=1)
    assert estimate_eta_s(record, ahead=3, mean_ms=None, workers=1, now_ms=2) is None


async def test_plain_boto3_clients_serve_the_cli(aws, stack, table_name, callbacks_queue):
    # The CLI's core install has boto3 but no aiobotocore: the same classes take it.
    table = TaskTable(aws.dynamodb, table_name)
    reporter = Reporter(aws.sns, stack.callback_topic_arn, table=table)
    await table.record_queued(make_task())

    view = await describe(table, "t-1")
    assert (view.record.status, view.queue_position) == (TaskStatus.QUEUED, 0)
    assert [r.id for r in await table.list_recent()] == ["t-1"]
    assert await reporter.cancel("t-1") is CancelOutcome.CANCELLED
    assert [c.status for c in drain_callbacks(callbacks_queue)] == [TaskStatus.CANCELLED]


async def test_eta_of_a_long_queued_task_is_learned_per_step(clients, table_name):
    # Issue 16: a 150-step task queued behind 4-step history was estimated at one
    # 4-step render. The time per step carries over; the task's steps are known.
    clock = FakeClock()
    table = TaskTable(clients[1], table_name, clock=clock)
    await table.record_queued(make_task("short"))
    await table.mark_running("short", total_steps=4)
    clock.now += 4  # 1 s per step
    await table.claim_terminal(finished("short"))
    long_task = make_task("long", content={"prompt": "x", "steps": 150})
    await table.record_queued(long_task)

    view = await describe(table, "long")

    assert view.record.planned_steps == 150
    assert view.eta_s == pytest.approx(150.0)


def test_learned_times_are_the_mean_and_the_median_step():
    from sdeks.lifecycle import learned_times_ms

    assert learned_times_ms([]) == (None, None)
    mean, step = learned_times_ms([(4000, 4), (9000, 3), (2000, 2), (5000, None)])
    assert (mean, step) == (5000, 1000)
    record = TaskRecord(id="x", status=TaskStatus.QUEUED, received_at=1, planned_steps=20)
    # Two tasks ahead on one worker at the mean, then its own 20 steps.
    eta = estimate_eta_s(record, ahead=2, mean_ms=mean, workers=1, now_ms=2, step_ms=step)
    assert eta == pytest.approx(2 * 5 + 20)


async def test_signed_callback_just_under_the_limit_is_fitted_with_its_signature(
    clients, stack, aws, callbacks_queue
):
    # GIVEN a callback that fits SNS on its own, but not with the two signature
    # attributes added (the window of ~120 bytes below 256 KiB)
    from sdeks.callback import MAX_SNS_MESSAGE_BYTES
    from sdeks.signing import verify_callback

    base = Callback(id="near", runtime="sdruntime", status=TaskStatus.SUCCEEDED, context="")
    pad = MAX_SNS_MESSAGE_BYTES - base.sns_size() - 40
    callback = base.model_copy(update={"context": "x" * pad})
    assert MAX_SNS_MESSAGE_BYTES - 120 < callback.sns_size() <= MAX_SNS_MESSAGE_BYTES
    reporter = Reporter(clients[0], stack.callback_topic_arn, signing_secret="s3cret")
    # WHEN it is published signed
    assert await reporter.finish(callback)
    # THEN SNS took it (body and every attribute within the limit), signed and trimmed
    answer = aws.sqs.receive_message(
        QueueUrl=callbacks_queue.queue_url, MessageAttributeNames=["All"], WaitTimeSeconds=1
    )
    (message,) = answer["Messages"]
    assert verify_callback("s3cret", message["Body"], message["MessageAttributes"])
    size = len(message["Body"].encode()) + sum(
        len(name) + len(a["DataType"]) + len(a["StringValue"])
        for name, a in message["MessageAttributes"].items()
    )
    assert size <= MAX_SNS_MESSAGE_BYTES
    got = Callback.model_validate_json(message["Body"])
    assert got.id == "near" and "sdeks_context_truncated" in got.context


async def test_hundred_thousand_unknown_fields_still_end_in_a_callback_that_fits(
    clients, stack, aws, callbacks_queue
):
    # GIVEN a task body of 100 000 unknown keys (the pod lists them as ignored)
    names = [f"unknown_field_{i}" for i in range(100_000)]
    callback = Callback(
        id="many-keys", runtime="sdruntime", status=TaskStatus.SUCCEEDED, ignored_fields=names
    )
    reporter = Reporter(clients[0], stack.callback_topic_arn, signing_secret="s3cret")
    # WHEN it ends, THEN its one callback is published and says how many were left out
    assert await reporter.finish(callback)
    (got,) = await asyncio.to_thread(callbacks_queue.poll)
    assert got.id == "many-keys" and got.status is TaskStatus.SUCCEEDED
    assert len(got.ignored_fields) + got.ignored_fields_dropped == 100_000
