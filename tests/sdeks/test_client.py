"""The client's callback listener on moto: filtered by id, subscribed before publish."""

from __future__ import annotations

import pytest

from sdeks.callback import Callback, TaskStatus
from sdeks.client import ClientError, SdeksClient, find_topic_arn, load_task_file


def publish_callback(aws, topic_arn: str, task_id: str, status: str) -> None:
    callback = Callback(id=task_id, runtime="sdruntime", status=TaskStatus(status))
    aws.sns.publish(**callback.sns_publish_kwargs(topic_arn))


def test_listener_sees_only_its_ids_and_waits_for_terminal(aws, stack):
    client = SdeksClient(
        sns=aws.sns,
        sqs=aws.sqs,
        s3=aws.s3,
        task_topic_arn=stack.task_topic_arn,
        callback_topic_arn=stack.callback_topic_arn,
    )
    seen: list[str] = []
    with client.listen(["mine"]) as listener:
        publish_callback(aws, stack.callback_topic_arn, "other", "succeeded")
        publish_callback(aws, stack.callback_topic_arn, "mine", "running")
        publish_callback(aws, stack.callback_topic_arn, "mine", "failed")
        done = listener.wait_terminal(
            ["mine"], timeout_s=10, on_event=lambda cb: cb and seen.append(f"{cb.id}:{cb.status}")
        )
    assert done["mine"].status == "failed"
    assert "other:succeeded" not in seen
    assert seen[0] == "mine:running"
    # the temporary queue is gone afterwards
    assert listener.queue_url not in aws.sqs.list_queues().get("QueueUrls", [])


def test_wait_terminal_times_out_naming_missing_ids(aws, stack):
    client = SdeksClient(
        sns=aws.sns, sqs=aws.sqs, s3=aws.s3, callback_topic_arn=stack.callback_topic_arn
    )
    with client.listen(["never"]) as listener, pytest.raises(ClientError, match="never"):
        listener.wait_terminal(["never"], timeout_s=1)


def test_topics_are_found_by_stack_name(aws, stack):
    name = stack.task_topic_arn.rsplit(":", 1)[-1]
    assert find_topic_arn(aws.sns, name) == stack.task_topic_arn
    with pytest.raises(ClientError, match="no SNS topic"):
        find_topic_arn(aws.sns, "no-such-topic-xyz")


def test_load_task_file_gives_serverless_bodies_an_id(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"input": {"api": {"endpoint": "/sdapi/v1/txt2img"}, "payload": {}}}')
    body, task = load_task_file(path, runtime="sdruntime")
    assert body["id"] == task.id and task.id.startswith("task-")


def test_load_task_file_reports_bad_json(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{nope")
    with pytest.raises(ClientError, match="not valid JSON"):
        load_task_file(path)


def test_runtimes_lists_this_stacks_queues_only(aws):
    import uuid

    from sdeks.names import StackNames

    # GIVEN stack `p` beside stacks whose names start with p's: `p-a` (its queues begin
    # with "p-" too) and `p0`, plus queues that only look like p's
    p = f"r{uuid.uuid4().hex[:8]}"
    for name in (
        f"{p}-sdruntime-tasks",
        f"{p}-sdxl-tasks",
        f"{p}-catch-all",
        f"{p}-a-sdruntime-tasks",  # stack p-a's runtime sdruntime, not p's "a-sdruntime"
        f"{p}-a-catch-all",
        f"{p}0-other-tasks",
        f"{p}-Bad_Name-tasks",
        f"{p}-sdruntime-dlq",
    ):
        aws.sqs.create_queue(QueueName=name)

    # WHEN each stack's client lists its runtimes, THEN each sees exactly its own
    def runtimes(prefix: str) -> list[str]:
        return SdeksClient(sns=aws.sns, sqs=aws.sqs, s3=aws.s3, names=StackNames(prefix)).runtimes()

    assert runtimes(p) == ["sdruntime", "sdxl"]
    assert runtimes(f"{p}-a") == ["sdruntime"]
    assert runtimes(f"{p}0") == ["other"]
