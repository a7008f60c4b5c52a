"""Create the stack's messaging and storage resources through the AWS APIs.

The embedded local stack calls this against moto server; the CDK app declares
the same resources (same names from `sdeks.names`, same filter policies,
same redrive) for a real account.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sdeks.names import (
    MAX_RECEIVE_COUNT,
    MESSAGE_RETENTION_S,
    VISIBILITY_TIMEOUT_S,
    WEBHOOK_VISIBILITY_TIMEOUT_S,
    StackNames,
    catch_all_filter_policy,
    runtime_filter_policy,
)
from sdeks.tasks import TTL_ATTRIBUTE, table_schema
from sdeks.webhooks import WEBHOOK_FILTER_POLICY


@dataclass
class StackResources:
    """Identifiers of a created stack, as the services' settings want them."""

    task_topic_arn: str
    callback_topic_arn: str
    queues: dict[str, str]  # runtime -> queue URL
    dlqs: dict[str, str]  # runtime -> DLQ URL
    catch_all_queue_url: str
    catch_all_dlq_url: str
    webhook_queue_url: str
    output_bucket: str
    models_bucket: str
    task_table: str


def _queue_with_dlq(
    sqs: Any, name: str, dlq_name: str, visibility_timeout_s: int = VISIBILITY_TIMEOUT_S
) -> tuple[str, str, str]:
    dlq_url = sqs.create_queue(
        QueueName=dlq_name, Attributes={"MessageRetentionPeriod": str(MESSAGE_RETENTION_S)}
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(visibility_timeout_s),
            "MessageRetentionPeriod": str(MESSAGE_RETENTION_S),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)}
            ),
        },
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return url, arn, dlq_url


def create_stack_resources(
    *,
    sns: Any,
    sqs: Any,
    s3: Any,
    dynamodb: Any,
    runtimes: list[str],
    names: StackNames,
    visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
) -> StackResources:
    """Create (idempotently) every topic, queue, subscription, bucket and table.

    `visibility_timeout_s` other than the default is for tests that crash
    dispatchers on purpose and do not want to wait a minute for redelivery.
    """
    task_topic = sns.create_topic(Name=names.task_topic)["TopicArn"]
    callback_topic = sns.create_topic(Name=names.callback_topic)["TopicArn"]

    queues: dict[str, str] = {}
    dlqs: dict[str, str] = {}
    for runtime in runtimes:
        url, arn, dlq_url = _queue_with_dlq(
            sqs, names.task_queue(runtime), names.task_dlq(runtime), visibility_timeout_s
        )
        sns.subscribe(
            TopicArn=task_topic,
            Protocol="sqs",
            Endpoint=arn,
            Attributes={"FilterPolicy": json.dumps(runtime_filter_policy(runtime))},
        )
        queues[runtime] = url
        dlqs[runtime] = dlq_url

    catch_url, catch_arn, catch_dlq = _queue_with_dlq(
        sqs, names.catch_all_queue, names.catch_all_dlq, visibility_timeout_s
    )
    sns.subscribe(
        TopicArn=task_topic,
        Protocol="sqs",
        Endpoint=catch_arn,
        Attributes={"FilterPolicy": json.dumps(catch_all_filter_policy(runtimes))},
    )

    # Terminal callbacks fan out to the webhooks queue too; the dispatcher delivers them.
    webhook_url, webhook_arn, _ = _queue_with_dlq(
        sqs, names.webhook_queue, names.webhook_dlq, WEBHOOK_VISIBILITY_TIMEOUT_S
    )
    sns.subscribe(
        TopicArn=callback_topic,
        Protocol="sqs",
        Endpoint=webhook_arn,
        Attributes={"FilterPolicy": json.dumps(WEBHOOK_FILTER_POLICY)},
    )

    for bucket in (names.output_bucket, names.models_bucket):
        s3.create_bucket(Bucket=bucket)

    try:
        dynamodb.create_table(**table_schema(names.task_table))
        dynamodb.update_time_to_live(
            TableName=names.task_table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
        )
    except dynamodb.exceptions.ResourceInUseException:
        pass

    return StackResources(
        task_topic_arn=task_topic,
        callback_topic_arn=callback_topic,
        queues=queues,
        dlqs=dlqs,
        catch_all_queue_url=catch_url,
        catch_all_dlq_url=catch_dlq,
        webhook_queue_url=webhook_url,
        output_bucket=names.output_bucket,
        models_bucket=names.models_bucket,
        task_table=names.task_table,
    )
