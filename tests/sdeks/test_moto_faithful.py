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
