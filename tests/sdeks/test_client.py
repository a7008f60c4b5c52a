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
