"""The stack's routing: runtime queues by attribute, everything else to the catch-all."""

from __future__ import annotations

import json


def _receive_all(sqs, url: str) -> list[str]:
    out = []
    for _ in range(3):
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        msgs = got.get("Messages", [])
        out.extend(json.loads(m["Body"])["Message"] for m in msgs)
        if not msgs:
            break
    return out


def test_routing_runtime_attribute_goes_to_runtime_queue_only(aws, stack):
    aws.sns.publish(
        TopicArn=stack.task_topic_arn,
        Message="for-sdruntime",
        MessageAttributes={"runtime": {"DataType": "String", "StringValue": "sdruntime"}},
    )
    assert _receive_all(aws.sqs, stack.queues["sdruntime"]) == ["for-sdruntime"]
    assert _receive_all(aws.sqs, stack.catch_all_queue_url) == []


def test_routing_missing_or_unknown_runtime_goes_to_catch_all(aws, stack):
    aws.sns.publish(TopicArn=stack.task_topic_arn, Message="no-attribute")
    aws.sns.publish(
        TopicArn=stack.task_topic_arn,
        Message="unknown-runtime",
        MessageAttributes={"runtime": {"DataType": "String", "StringValue": "nope"}},
    )
    assert sorted(_receive_all(aws.sqs, stack.catch_all_queue_url)) == [
        "no-attribute",
        "unknown-runtime",
    ]
    assert _receive_all(aws.sqs, stack.queues["sdruntime"]) == []


def test_queues_redrive_to_their_dlq(aws, stack):
    attrs = aws.sqs.get_queue_attributes(
        QueueUrl=stack.queues["sdruntime"], AttributeNames=["RedrivePolicy"]
    )["Attributes"]
    dlq_arn = aws.sqs.get_queue_attributes(
        QueueUrl=stack.dlqs["sdruntime"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    assert json.loads(attrs["RedrivePolicy"])["deadLetterTargetArn"] == dlq_arn
