"""Where the embedded AWS is made to behave as AWS does (`sdeks.local.make_moto_faithful`)."""

from __future__ import annotations

import json
import uuid


def _subscribed_queue(aws, topic_arn: str, name: str) -> str:
    url = aws.sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    aws.sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=arn)
    return url


def test_publish_survives_a_subscriber_whose_queue_was_deleted(aws) -> None:
    # GIVEN a topic with two SQS subscribers, one of which deleted its queue
    # without unsubscribing (a listener that crashed, a test that cleaned up badly)
    label = uuid.uuid4().hex[:8]
    topic_arn = aws.sns.create_topic(Name=f"faithful-{label}")["TopicArn"]
    gone = _subscribed_queue(aws, topic_arn, f"gone-{label}")
    kept = _subscribed_queue(aws, topic_arn, f"kept-{label}")
    aws.sqs.delete_queue(QueueUrl=gone)
    # WHEN something publishes to the topic
    answer = aws.sns.publish(TopicArn=topic_arn, Message=json.dumps({"id": label}))
    # THEN the publish succeeds (AWS drops only that delivery) and the other subscriber has it
    assert answer["MessageId"]
    got = aws.sqs.receive_message(QueueUrl=kept, WaitTimeSeconds=1)["Messages"]
    assert json.loads(json.loads(got[0]["Body"])["Message"]) == {"id": label}


def test_publish_counts_attributes_and_utf8_bytes_against_the_limit(aws) -> None:
    import pytest
    from botocore.exceptions import ClientError

    topic_arn = aws.sns.create_topic(Name=f"faithful-{uuid.uuid4().hex[:8]}")["TopicArn"]
    attribute = {"big": {"DataType": "String", "StringValue": "a" * 100}}
    # fits in characters and bytes alone, not with the attribute (AWS counts both)
    with pytest.raises(ClientError, match="too long"):
        aws.sns.publish(TopicArn=topic_arn, Message="x" * 262_100, MessageAttributes=attribute)
    # fits in characters, not in UTF-8 bytes
    with pytest.raises(ClientError, match="too long"):
        aws.sns.publish(TopicArn=topic_arn, Message="\u732b" * 100_000)
    assert aws.sns.publish(TopicArn=topic_arn, Message="x" * 262_000, MessageAttributes=attribute)
