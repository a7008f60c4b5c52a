"""The consumer end to end on the moto stack: SNS -> SQS -> dispatcher -> fake pod."""

from __future__ import annotations

import base64
import io
import json

from aiohttp import web
from PIL import Image

from tests.dispatcher.conftest import (
    envelope,
    eventually,
    publish,
    queue_depth,
    running,
    settings_for,
)
from tests.helpers import serve_app


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_dispatch_task_runs_on_pod_and_is_deleted(aws, stack, make_pod, callbacks):
    pod = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, envelope("t-one", model="v1-5-pruned-emaonly.safetensors"))
        got = await callbacks.wait_for(1)
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
    assert [c["id"] for c in got] == ["t-one"]
    assert got[0]["status"] == "succeeded" and got[0]["context"] == {"n": "t-one"}
    (job,) = pod.jobs
    assert job.model == "v1-5-pruned-emaonly.safetensors"
    assert job.attempt == 1 and job.published_at is not None


async def test_dispatch_invalid_envelope_fails_with_id_and_keeps_audit_copy(
    aws, stack, make_pod, callbacks
):
    pod = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, "this is not json")
        bad = envelope("bad-one")
        bad["task"]["metadata"]["tasktype"] = "paint-a-house"
        publish(aws, stack, bad)
        got = await callbacks.wait_for(2)
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
    assert sorted((c["id"] or "", c["error"]["code"]) for c in got) == [
        ("", "invalid_envelope"),
        ("bad-one", "invalid_envelope"),
    ]
    assert all(c["status"] == "failed" and c["result"] is False for c in got)
    assert pod.jobs == []
    kept = aws.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix="rejected/")["Contents"]
    bodies = [
        json.loads(aws.s3.get_object(Bucket=stack.output_bucket, Key=o["Key"])["Body"].read())
        for o in kept
    ]
    assert sorted(b["body"][:8] for b in bodies) == sorted(["this is ", json.dumps(bad)[:8]])


async def test_dispatch_unknown_runtime_fails_through_catch_all(aws, stack, make_pod, callbacks):
    pod = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, envelope("lost-one", runtime="nosuchruntime"), runtime="nosuchruntime")
        (got,) = await callbacks.wait_for(1)
        await eventually(lambda: queue_depth(aws, stack.catch_all_queue_url) == 0)
    assert got["id"] == "lost-one" and got["error"]["code"] == "unknown_runtime"
    assert got["context"] == {"n": "lost-one"}
    kept = aws.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix="rejected/")["KeyCount"]
    assert kept == 1


async def test_dispatch_catch_all_forwards_task_without_runtime_attribute(
    aws, stack, make_pod, callbacks
):
    pod = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, envelope("no-attr"), runtime=None)
        (got,) = await callbacks.wait_for(1)
        await eventually(lambda: queue_depth(aws, stack.catch_all_queue_url) == 0)
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
    assert got["id"] == "no-attr" and got["status"] == "succeeded"
    assert [j.task.id for j in pod.jobs] == ["no-attr"]
    assert pod.jobs[0].published_at is not None


async def test_dispatch_resolves_http_and_s3_links_to_base64(aws, stack, make_pod, callbacks):
    image = png_bytes()
    aws.s3.put_object(Bucket=stack.models_bucket, Key="inputs/cat.png", Body=image)

    async def serve_png(_: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", serve_png)
    pod = await make_pod()
    async with serve_app(app) as base, running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(
            aws,
            stack,
            envelope(
                "linked",
                init_images=[f"{base}/cat.png"],
                mask=f"s3://{stack.models_bucket}/inputs/cat.png",
            ),
        )
        (got,) = await callbacks.wait_for(1)
    assert got["status"] == "succeeded"
    content = pod.jobs[0].task.content
    assert base64.b64decode(content["init_images"][0]) == image
    assert base64.b64decode(content["mask"]) == image


async def test_dispatch_unreachable_link_fails_task(aws, stack, make_pod, callbacks):
    pod = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        # Port 9 on loopback: allow-listed, nothing listens.
        publish(aws, stack, envelope("dead-link", init_images=["http://127.0.0.1:9/x.png"]))
        publish(aws, stack, envelope("private-link", init_images=["http://10.1.2.3/x.png"]))
        got = await callbacks.wait_for(2)
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
    codes = {c["id"]: c["error"]["code"] for c in got}
    assert codes == {"dead-link": "link_unreachable", "private-link": "link_forbidden"}
    assert "127.0.0.1:9" in next(c for c in got if c["id"] == "dead-link")["error"]["message"]
    assert pod.jobs == []


async def test_dispatch_with_task_table_drops_finished_id_and_pins_seed(
    aws, stack, make_pod, callbacks
):
    from sdeks.lifecycle import Reporter
    from sdeks.tasks import TaskTable

    # GIVEN the task table, and a pod that ends tasks through it
    table = TaskTable(aws.dynamodb, stack.task_table)
    pod = await make_pod(reporter=Reporter(aws.sns, stack.callback_topic_arn, table=table))
    settings = settings_for(stack, {"sdruntime": [pod.url]}, task_table=stack.task_table)
    async with running(settings) as metrics:
        publish(aws, stack, envelope("only-once", seed=-1))
        await callbacks.wait_for(1)
        # WHEN the same id is published again after it finished
        publish(aws, stack, envelope("only-once", seed=-1))
        await eventually(lambda: queue_depth(aws, stack.queues["sdruntime"]) == 0)
        got = await callbacks.settle(0.5)
    # THEN it is not rendered again, and no second callback goes out
    assert [j.task.id for j in pod.jobs] == ["only-once"]
    assert [c["id"] for c in got] == ["only-once"]
    assert pod.jobs[0].task.content["seed"] != -1  # drawn once, stored for retries
    record = await table.get("only-once")
    assert record is not None and record.status.value == "succeeded"
    assert b'outcome="duplicate"' in metrics.render()


async def test_dispatch_failure_is_claimed_in_task_table(aws, stack, make_pod, callbacks):
    from sdeks.tasks import TaskTable

    pod = await make_pod()
    settings = settings_for(stack, {"sdruntime": [pod.url]}, task_table=stack.task_table)
    async with running(settings):
        publish(aws, stack, envelope("bad-link", init_images=["http://10.9.9.9/a.png"]))
        (got,) = await callbacks.wait_for(1)
    assert got["error"]["code"] == "link_forbidden"
    record = await TaskTable(aws.dynamodb, stack.task_table).get("bad-link")
    assert record is not None and record.status.value == "failed"


async def test_dispatch_serverless_envelope_named_by_sns_message_id(
    aws, stack, make_pod, callbacks
):
    pod = await make_pod()
    body = {
        "input": {
            "api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"},
            "payload": {"prompt": "a fox", "steps": 2},
        }
    }
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        message_id = publish(aws, stack, body)
        (got,) = await callbacks.wait_for(1)
    assert got["id"] == message_id and got["status"] == "succeeded"
    assert pod.jobs[0].task.content["prompt"] == "a fox"


async def test_dispatch_fails_fast_model_no_pod_can_obtain(aws, stack, make_pod, callbacks):
    pod = await make_pod(gpu=["a"], extra_state={"available": ["a.safetensors", "b"]})
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, envelope("no-such-model", model="zzz.safetensors"))
        publish(aws, stack, envelope("known-model", model="b.safetensors [0123abcd]"))
        got = await callbacks.wait_for(2)
    codes = {c["id"]: (c["error"] or {}).get("code") for c in got}
    assert codes == {"no-such-model": "model_not_found", "known-model": None}
    assert [j.task.id for j in pod.jobs] == ["known-model"]


async def test_dispatch_prefetch_hint_for_next_model(aws, stack, make_pod, callbacks):
    # GIVEN one pod rendering the last "a" task while a "b" task waits
    pod = await make_pod(gpu=["a"], delay_s=1.5)
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, envelope("first-a", model="a"))
        await eventually(lambda: len(pod.jobs) == 1)
        publish(aws, stack, envelope("then-b", model="b"))
        await callbacks.wait_for(2)
    # THEN the pod was told to load "b" while it rendered "a"
    assert pod.prefetched[:1] == ["b"]
    assert [j.model for j in pod.jobs] == ["a", "b"]


async def test_dispatch_link_ahead_bounds_tasks_holding_images(aws, stack, make_pod, callbacks):
    # GIVEN room for one task's images at a time and a slow single pod
    image = png_bytes()
    held: list[int] = []  # at each download: image tasks downloaded and not yet finished

    async def serve_png(_: web.Request) -> web.Response:
        done = len([i for i in pod.finished if i.startswith("img-")])
        held.append(len(held) + 1 - done)
        return web.Response(body=image, content_type="image/png")

    app = web.Application()
    app.router.add_get("/x.png", serve_png)
    pod = await make_pod(delay_s=0.3)
    settings = settings_for(stack, {"sdruntime": [pod.url]}, link_ahead=1)
    async with serve_app(app) as base, running(settings):
        for i in range(3):
            link = f"{base}/x.png?i={i}"
            publish(aws, stack, envelope(f"img-{i}", init_images=[link]))
        publish(aws, stack, envelope("plain"))
        got = await callbacks.wait_for(4)
    # THEN every task completes, and no download started while another image task
    # still held its images
    assert sorted(c["id"] for c in got) == ["img-0", "img-1", "img-2", "plain"]
    assert all(c["status"] == "succeeded" for c in got)
    assert held == [1, 1, 1]


async def test_dispatch_affinity_switches_less_than_fifo_through_real_dispatcher(
    aws, stack, make_pod, callbacks
):
    # GIVEN two pods and tasks cycling through three models, all published at once
    def switches(pod) -> int:
        models = [j.model for j in pod.jobs]
        return sum(1 for a, b in zip([None, *models], models, strict=False) if a != b)

    counts = {}
    for policy in ("fifo", "affinity"):
        pods = [await make_pod(delay_s=0.05), await make_pod(delay_s=0.05)]
        settings = settings_for(
            stack, {"sdruntime": [p.url for p in pods]}, policy=policy, inference_estimate_s=0.05
        )
        callbacks.received.clear()
        async with running(settings):
            for i in range(12):
                publish(aws, stack, envelope(f"{policy}-{i}", model="abc"[i % 3]))
            await callbacks.wait_for(12, within=60)
        counts[policy] = sum(switches(p) for p in pods)
    # THEN affinity loads each model about once per pod; FIFO reloads on most jobs
    assert counts["affinity"] < counts["fifo"], counts


async def test_dispatch_keeps_a_number_published_at_attribute(aws, stack, make_pod, callbacks):
    # GIVEN a task in its runtime queue as the catch-all forwards it: the original
    # publish time in a Number attribute (and a Binary one beside it)
    pod = await make_pod()
    aws.sqs.send_message(
        QueueUrl=stack.queues["sdruntime"],
        MessageBody=json.dumps(envelope("stamped")),
        MessageAttributes={
            "published_at": {"DataType": "Number", "StringValue": "1700000000.25"},
            "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
        },
    )
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        (got,) = await callbacks.wait_for(1)
    # THEN the job carries that publish time, not the forward's
    assert got["id"] == "stamped" and got["status"] == "succeeded"
    assert pod.jobs[0].published_at == 1700000000.25


async def test_dispatch_catch_all_copy_of_an_array_runtime_leaves_the_task_to_its_queue(
    aws, stack, make_pod, callbacks
):
    from sdeks.lifecycle import Reporter
    from sdeks.tasks import TaskTable

    # GIVEN a legacy body (no runtime of its own) published with a String.Array
    # `runtime`: SNS puts one copy in the sdruntime queue, one in the catch-all
    legacy = {
        "alwayson_scripts": {"task": "text-to-image", "id_task": "fan-out", "save_dir": "output"},
        "prompt": "a cat",
        "steps": 2,
    }
    aws.sns.publish(
        TopicArn=stack.task_topic_arn,
        Message=json.dumps(legacy),
        MessageAttributes={
            "runtime": {"DataType": "String.Array", "StringValue": '["sdruntime", "other"]'}
        },
    )
    assert queue_depth(aws, stack.queues["sdruntime"]) == 1
    assert queue_depth(aws, stack.catch_all_queue_url) == 1
    table = TaskTable(aws.dynamodb, stack.task_table)
    pod = await make_pod(reporter=Reporter(aws.sns, stack.callback_topic_arn, table=table))
    # WHEN the catch-all copy is handled first (its runtime queue not consumed yet)
    idle = aws.sqs.create_queue(QueueName=f"{stack.output_bucket}-idle")["QueueUrl"]
    first = settings_for(
        stack, {"sdruntime": [pod.url]}, task_table=stack.task_table, queues={"sdruntime": idle}
    )
    async with running(first) as metrics:
        await eventually(lambda: queue_depth(aws, stack.catch_all_queue_url) == 0)
    # THEN it was dropped without a refusal: no callback, the id not claimed
    assert await callbacks.settle(0.3) == []
    assert b'outcome="fan-out copy"' in metrics.render()
    # AND the copy in the runtime's queue renders the task
    async with running(settings_for(stack, {"sdruntime": [pod.url]}, task_table=stack.task_table)):
        (got,) = await callbacks.wait_for(1)
    assert (got["id"], got["status"]) == ("fan-out", "succeeded")
    assert [j.task.id for j in pod.jobs] == ["fan-out"]


async def test_dispatch_metrics_label_unknown_runtimes_as_other(aws, stack, make_pod, callbacks):
    # GIVEN tasks naming runtimes nobody serves, each a new name (a hostile publisher)
    pod = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [pod.url]})) as metrics:
        for i in range(3):
            name = f"evil-{i}"
            publish(aws, stack, envelope(f"evil-task-{i}", runtime=name), runtime=name)
        got = await callbacks.wait_for(3)
        await eventually(lambda: queue_depth(aws, stack.catch_all_queue_url) == 0)
        text = metrics.render().decode()
    # THEN each gets its failed callback, and the metrics mint no label per name
    assert sorted(c["error"]["code"] for c in got) == ["unknown_runtime"] * 3
    assert "evil-" not in text
    assert 'sdeks_dispatcher_jobs_total{outcome="failed",runtime="other"} 3.0' in text
