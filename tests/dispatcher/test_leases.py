"""Leases that never lose a task: heartbeats, pod failures, retries, the DLQ, drain."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from dispatcher.leases import LeaseKeeper
from sdeks import aws as sdeks_aws
from tests.dispatcher.conftest import (
    envelope,
    eventually,
    publish,
    queue_depth,
    running,
    settings_for,
)


def visible(aws, url: str) -> int:
    return int(
        aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])[
            "Attributes"
        ]["ApproximateNumberOfMessages"]
    )


async def test_leases_task_longer_than_visibility_timeout_runs_exactly_once(
    aws, stack, make_pod, callbacks
):
    # GIVEN a queue whose messages reappear after 1 s, and two dispatcher replicas
    queue = stack.queues["sdruntime"]
    aws.sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": "1"})
    pod = await make_pod(delay_s=3.0)
    settings = settings_for(stack, {"sdruntime": [pod.url]})
    async with running(settings), running(settings):
        # WHEN a task renders for 3x the visibility timeout
        publish(aws, stack, envelope("long-one"))
        await callbacks.wait_for(1, within=30)
        await eventually(lambda: queue_depth(aws, queue) == 0)
        got = await callbacks.settle(1.5)
    # THEN the pod saw it once and one callback exists
    assert [j.task.id for j in pod.jobs] == ["long-one"]
    assert [c["id"] for c in got] == ["long-one"]


async def test_leases_pod_killed_mid_task_completes_on_another_pod(aws, stack, make_pod, callbacks):
    # GIVEN pod A holds the model (so affinity picks it) and dies while rendering
    started = asyncio.Event()

    async def die(_job):
        started.set()
        await asyncio.sleep(60)

    doomed = await make_pod(gpu=["m1"], behaviour=die)
    healthy = await make_pod()
    settings = settings_for(stack, {"sdruntime": [doomed.url, healthy.url]})
    async with running(settings):
        publish(aws, stack, envelope("survivor", model="m1"))
        await asyncio.wait_for(started.wait(), 20)
        await doomed.stop()  # the pod process goes away: its connections drop
        await callbacks.wait_for(1)
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
        got = await callbacks.settle(0.5)
    assert [j.task.id for j in doomed.jobs] == ["survivor"]
    assert [j.task.id for j in healthy.jobs] == ["survivor"]
    assert [(c["id"], c["status"]) for c in got] == [("survivor", "succeeded")]


async def test_leases_pod_that_stops_answering_is_dropped_and_task_rescheduled(
    aws, stack, make_pod, callbacks
):
    # GIVEN pod A accepts the job, then hangs: no answer, and its state stops answering
    hung = asyncio.Event()

    async def hang(_job):
        hung.set()
        await asyncio.sleep(120)

    stuck = await make_pod(gpu=["m1"], behaviour=hang)
    other = await make_pod()

    settings = settings_for(stack, {"sdruntime": [stuck.url, other.url]}, pod_failure_threshold=2)
    async with running(settings) as metrics:
        publish(aws, stack, envelope("rescued", model="m1"))
        await asyncio.wait_for(hung.wait(), 20)
        stuck.state_status = 503
        await callbacks.wait_for(1)
        got = await callbacks.settle(0.5)
    assert [j.task.id for j in other.jobs] == ["rescued"]
    assert [c["id"] for c in got] == ["rescued"]
    assert b'sdeks_dispatcher_pod_retries_total{runtime="sdruntime"} 1.0' in metrics.render()


async def test_leases_busy_pod_429_goes_elsewhere(aws, stack, make_pod, callbacks):
    async def full(_job):
        return web.json_response({"detail": "no free slot"}, status=429)

    busy = await make_pod(gpu=["m1"], behaviour=full)
    free = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [busy.url, free.url]})):
        publish(aws, stack, envelope("overflow", model="m1"))
        (got,) = await callbacks.wait_for(1)
    assert got["status"] == "succeeded"
    assert [j.task.id for j in free.jobs] == ["overflow"]


async def test_leases_pod_refusing_job_gives_failed_callback(aws, stack, make_pod, callbacks):
    async def refuse(_job):
        return web.json_response(
            {"error": {"code": "invalid_parameter", "message": "steps: must be <= 150"}},
            status=422,
        )

    pod = await make_pod(behaviour=refuse)
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, envelope("refused"))
        (got,) = await callbacks.wait_for(1)
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
    assert got["error"] == {"code": "invalid_parameter", "message": "steps: must be <= 150"}
    assert len(pod.jobs) == 1


async def test_leases_after_max_receive_count_failed_callback_and_dlq(
    aws, stack, make_pod, callbacks
):
    # GIVEN a queue that dead-letters after 2 receives and a pod that always fails
    queue = stack.queues["sdruntime"]
    dlq_arn = aws.sqs.get_queue_attributes(
        QueueUrl=stack.dlqs["sdruntime"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    aws.sqs.set_queue_attributes(
        QueueUrl=queue,
        Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})
        },
    )

    async def crash(_job):
        return web.Response(status=500)

    pod = await make_pod(behaviour=crash)
    settings = settings_for(stack, {"sdruntime": [pod.url]}, pod_attempts=1, retry_backoff_s=0)
    async with running(settings):
        publish(aws, stack, envelope("doomed"))
        # THEN one dispatch_failed callback on the last receive, and the message in the DLQ
        (got,) = await callbacks.wait_for(1)
        await eventually(lambda: visible(aws, stack.dlqs["sdruntime"]) == 1)
        got_all = await callbacks.settle(0.5)
    assert got["id"] == "doomed" and got["error"]["code"] == "dispatch_failed"
    assert len(got_all) == 1
    assert [j.attempt for j in pod.jobs] == [1, 2]
    assert queue_depth(aws, queue) == 0


async def test_leases_sigterm_releases_waiting_and_finishes_running(
    aws, stack, make_pod, callbacks
):
    # GIVEN one single-slot pod busy with a task and a second task waiting for it
    started = asyncio.Event()

    async def note(_job):
        started.set()
        return None

    pod = await make_pod(delay_s=1.5, behaviour=note)
    settings = settings_for(stack, {"sdruntime": [pod.url]}, grace_period_s=20)
    queue = stack.queues["sdruntime"]
    async with running(settings):
        publish(aws, stack, envelope("running-one"))
        await asyncio.wait_for(started.wait(), 20)
        publish(aws, stack, envelope("waiting-one"))
        await eventually(lambda: visible(aws, queue) == 0)  # both held
        # WHEN the dispatcher is told to stop (end of the `running` block)
    # THEN the running task finished and was deleted, the waiting one is back in the queue
    got = await callbacks.wait_for(1)
    assert [c["id"] for c in got] == ["running-one"]
    assert [j.task.id for j in pod.jobs] == ["running-one"]
    assert visible(aws, queue) == 1


async def test_leases_grace_period_expiry_releases_running_task(aws, stack, make_pod):
    started = asyncio.Event()

    async def note(_job):
        started.set()
        return None

    pod = await make_pod(delay_s=30, behaviour=note)
    settings = settings_for(stack, {"sdruntime": [pod.url]}, grace_period_s=0.5)
    queue = stack.queues["sdruntime"]
    async with running(settings):
        publish(aws, stack, envelope("cut-short"))
        await asyncio.wait_for(started.wait(), 20)
    assert visible(aws, queue) == 1


async def test_lease_keeper_batches_heartbeats_and_marks_lost(aws, stack):
    queue = stack.queues["sdruntime"]
    for i in range(12):
        aws.sqs.send_message(QueueUrl=queue, MessageBody=str(i))
    messages = []
    while len(messages) < 12:
        messages += aws.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    async with sdeks_aws.aio_client("sqs") as sqs:
        keeper = LeaseKeeper(sqs, extension_s=30, interval_s=10)
        leases = [keeper.hold(queue, m["ReceiptHandle"], m["MessageId"]) for m in messages]
        bogus = keeper.hold(queue, "not-a-receipt-handle", "bogus")
        assert await keeper.heartbeat() == 12
        assert bogus.lost and not any(lease.lost for lease in leases)
        for lease in leases:
            await keeper.delete(lease)
    assert queue_depth(aws, queue) == 0


async def test_leases_pod_already_running_task_releases_for_later(aws, stack, make_pod, callbacks):
    # GIVEN a pod that already renders this id (an abandoned attempt, another replica)
    async def conflict(_job):
        return web.json_response({"detail": "task dup is already running"}, status=409)

    pod = await make_pod(behaviour=conflict)
    queue = stack.queues["sdruntime"]
    async with running(settings_for(stack, {"sdruntime": [pod.url]})) as metrics:
        publish(aws, stack, envelope("dup"))
        await eventually(lambda: b'outcome="released"' in metrics.render())
    # THEN it is not sent anywhere else, nothing is published, and the message waits
    assert len(pod.jobs) == 1
    assert await callbacks.settle(0.2) == []
    assert queue_depth(aws, queue) == 1 and visible(aws, queue) == 0


async def test_lease_keeper_batches_deletes(aws, stack):
    import asyncio

    queue = stack.queues["sdruntime"]
    for i in range(15):
        aws.sqs.send_message(QueueUrl=queue, MessageBody=str(i))
    messages = []
    while len(messages) < 15:
        messages += aws.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    calls: list[int] = []
    async with sdeks_aws.aio_client("sqs") as sqs:
        original = sqs.delete_message_batch

        async def counting(**kwargs):
            calls.append(len(kwargs["Entries"]))
            return await original(**kwargs)

        sqs.delete_message_batch = counting
        keeper = LeaseKeeper(sqs, extension_s=30, interval_s=10)
        leases = [keeper.hold(queue, m["ReceiptHandle"], m["MessageId"]) for m in messages]
        await asyncio.gather(*(keeper.delete(lease) for lease in leases))
    assert sorted(calls) == [5, 10]
    assert queue_depth(aws, queue) == 0


async def test_leases_two_replicas_share_queue_without_duplicates(aws, stack, make_pod, callbacks):
    pods = [await make_pod(delay_s=0.05, slots=2), await make_pod(delay_s=0.05, slots=2)]
    settings = settings_for(stack, {"sdruntime": [p.url for p in pods]}, window=8)
    ids = [f"many-{i}" for i in range(12)]
    async with running(settings), running(settings):
        for task_id in ids:
            publish(aws, stack, envelope(task_id, model=f"m{int(task_id[5:]) % 3}"))
        await callbacks.wait_for(len(ids), within=60)
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
        got = await callbacks.settle(0.5)
    rendered = sorted(j.task.id for p in pods for j in p.jobs)
    assert rendered == sorted(ids)
    assert sorted(c["id"] for c in got) == sorted(ids)


async def test_leases_stop_with_full_window_releases_all(aws, stack, make_pod):
    # GIVEN a window of 2, both held by tasks waiting for a pod that never frees up
    started = asyncio.Event()

    async def note(_job):
        started.set()
        return None

    pod = await make_pod(delay_s=30, behaviour=note)
    settings = settings_for(stack, {"sdruntime": [pod.url]}, window=2, grace_period_s=0.2)
    queue = stack.queues["sdruntime"]
    async with running(settings):
        for i in range(3):
            publish(aws, stack, envelope(f"full-{i}"))
        await asyncio.wait_for(started.wait(), 20)
        await eventually(lambda: visible(aws, queue) == 1)  # two held, one left
    # THEN the waiting and the running task are both back in the queue
    assert visible(aws, queue) == 3
