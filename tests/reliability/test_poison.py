"""A poison task that kills its pod every time: after the queue's maxReceiveCount it
ends with one failed callback and its message lands in the DLQ; the other tasks,
published beside it, all succeed.

No real input crashes the real pod (every failure inside a render becomes a
failed callback), so the pods here are the real runtime run through
`tests/reliability/crashpod.py`, which SIGKILLs its own process when a task's
prompt carries the poison marker, after the pod has marked the task running.
A supervisor restarts dead pods, as Kubernetes would. The stack's dispatcher
tries one pod per receive and releases at once, so the five receives take
seconds, not minutes.
"""

from __future__ import annotations

import json
import time
import uuid

from sdeks.client import SdeksClient
from sdeks.envelope import Task, TaskType
from sdeks.local import LocalStack
from sdeks.names import MAX_RECEIVE_COUNT
from tests.reliability.conftest import POISON

TIMEOUT_S = 180
SETTLE_S = 3


def body(task_id: str, prompt: str) -> dict:
    return Task(
        id=task_id,
        runtime="sdruntime",
        tasktype=TaskType.TEXT_TO_IMAGE,
        prefix="poison",
        context={"probe": task_id},
        content={"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 3},
    ).to_envelope()


def test_poison_task_reaches_the_dlq_with_one_failed_callback_and_spares_the_others(
    hostile: LocalStack,
):
    assert hostile.resources
    resources = hostile.resources
    supervisor = hostile.supervisor  # type: ignore[attr-defined]
    client = SdeksClient(
        sns=hostile.client("sns"),
        sqs=hostile.client("sqs"),
        s3=hostile.client("s3"),
        task_topic_arn=resources.task_topic_arn,
        callback_topic_arn=resources.callback_topic_arn,
    )
    poison_id = f"poison-{uuid.uuid4().hex[:8]}"
    others = [f"bystander-{n}-{uuid.uuid4().hex[:6]}" for n in range(6)]
    ids = [poison_id, *others]

    # WHEN the poison task is published among ordinary ones (right behind them, so they
    # need not all wait for pods the poison keeps killing: this suite runs on 2 cores)
    with client.listen(ids) as listener:
        for task_id in others[:4]:
            client.publish(body(task_id, "a cat"), runtime="sdruntime")
        client.publish(body(poison_id, f"a cat {POISON}"), runtime="sdruntime")
        for task_id in others[4:]:
            client.publish(body(task_id, "a cat"), runtime="sdruntime")
        first = listener.wait_terminal(ids, timeout_s=TIMEOUT_S)
        late = []
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            late += [c for c in listener.poll(wait_s=1) if c.status.terminal]

    # THEN the poison task ends once, failed, after maxReceiveCount receives
    assert late == [], late
    poison = first[poison_id]
    assert poison.status == "failed" and poison.error is not None, poison
    assert poison.error.code == "dispatch_failed", poison.error
    assert f"{MAX_RECEIVE_COUNT} receives" in poison.error.message
    assert poison.context == {"probe": poison_id}
    row = hostile.client("dynamodb").get_item(
        TableName=resources.task_table, Key={"id": {"S": poison_id}}
    )["Item"]
    assert row["status"]["S"] == "failed"
    assert int(row["attempts"]["N"]) == MAX_RECEIVE_COUNT
    # ... it killed the pod that ran it on every receive that reached one (a receive may
    # also fail on a pod that is still down); the supervisor brought the pods back
    crashes = (hostile.workdir / "crashes.log").read_text().split()[::2]
    assert 0 < crashes.count(poison_id) <= MAX_RECEIVE_COUNT
    assert supervisor.errors == []
    # ... and SQS moved its message to the DLQ
    sqs = hostile.client("sqs")
    dead: list[dict] = []
    deadline = time.monotonic() + 60
    while not dead and time.monotonic() < deadline:
        answer = sqs.receive_message(
            QueueUrl=resources.dlqs["sdruntime"], MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        dead = answer.get("Messages", [])
    assert len(dead) == 1
    assert poison_id in json.loads(dead[0]["Body"])["Message"]

    # AND every other task succeeded, with its image
    for task_id in others:
        callback = first[task_id]
        assert callback.status == "succeeded", (task_id, callback.error)
        assert len(callback.image_url) == 1
