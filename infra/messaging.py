"""Topics and queues: the task topic fans out to a queue per runtime plus the catch-all.

Mirrors `sdeks.resources.create_stack_resources` (the local stack): same names,
same filter policies, same redrive, same visibility timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from sdeks.names import (
    MAX_RECEIVE_COUNT,
    VISIBILITY_TIMEOUT_S,
    StackNames,
    catch_all_filter_policy,
    runtime_filter_policy,
)

_RETENTION = Duration.days(14)


@dataclass(frozen=True)
class TaskQueue:
    queue: sqs.Queue
    dlq: sqs.Queue


def _filter(policy: dict[str, list[object]]) -> dict[str, sns.SubscriptionFilter]:
    # The policy dicts in sdeks.names are the wire form; SubscriptionFilter takes them as is,
    # so the deployed policy is exactly what the local stack (and its tests) use.
    return {attr: sns.SubscriptionFilter(conditions=conds) for attr, conds in policy.items()}


class Messaging(Construct):
    """Task topic, per-runtime queues, catch-all, DLQs and the callback topic, all KMS-encrypted.

    Customer-managed keys: SNS must encrypt into the queues, which the AWS-managed
    SQS key cannot allow (its key policy is fixed); `SqsSubscription` adds the
    `sns.amazonaws.com` statement to the queue key's policy.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        names: StackNames,
        runtimes: list[str],
    ) -> None:
        super().__init__(scope, id)
        # Two keys, not one: the queue key's policy names the task topic (SNS may encrypt
        # into the queues only on behalf of that topic), and the topic is encrypted with
        # its key, so one shared key would be a circular dependency.
        self.topic_key = self._key("TopicKey", f"{names.prefix}-topics", "SNS topics")
        self.queue_key = self._key("QueueKey", f"{names.prefix}-queues", "SQS queues")
        self.task_topic = sns.Topic(
            self,
            "TaskTopic",
            topic_name=names.task_topic,
            master_key=self.topic_key,
            enforce_ssl=True,
        )
        self.callback_topic = sns.Topic(
            self,
            "CallbackTopic",
            topic_name=names.callback_topic,
            master_key=self.topic_key,
            enforce_ssl=True,
        )

        self.runtime_queues: dict[str, TaskQueue] = {}
        for runtime in runtimes:
            pair = self._queue_pair(
                f"Runtime-{runtime}", names.task_queue(runtime), names.task_dlq(runtime)
            )
            self.task_topic.add_subscription(
                subs.SqsSubscription(
                    pair.queue, filter_policy=_filter(runtime_filter_policy(runtime))
                )
            )
            self.runtime_queues[runtime] = pair

        self.catch_all = self._queue_pair("CatchAll", names.catch_all_queue, names.catch_all_dlq)
        self.task_topic.add_subscription(
            subs.SqsSubscription(
                self.catch_all.queue, filter_policy=_filter(catch_all_filter_policy(runtimes))
            )
        )

    def _key(self, id: str, alias: str, what: str) -> kms.Key:
        return kms.Key(
            self,
            id,
            alias=f"alias/{alias}",
            description=f"{alias}: {what}",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.DESTROY,
        )

    def _queue_pair(self, id: str, name: str, dlq_name: str) -> TaskQueue:
        common: dict[str, Any] = {
            "encryption": sqs.QueueEncryption.KMS,
            "encryption_master_key": self.queue_key,
            "enforce_ssl": True,
            "retention_period": _RETENTION,
        }
        dlq = sqs.Queue(self, f"{id}Dlq", queue_name=dlq_name, **common)
        queue = sqs.Queue(
            self,
            id,
            queue_name=name,
            # The dispatcher extends the lease (ChangeMessageVisibility) well before this
            # ends while a task renders, so a crash frees the task within a minute.
            visibility_timeout=Duration.seconds(VISIBILITY_TIMEOUT_S),
            dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=MAX_RECEIVE_COUNT),
            **common,
        )
        return TaskQueue(queue=queue, dlq=dlq)

    @property
    def all_pairs(self) -> list[TaskQueue]:
        return [*self.runtime_queues.values(), self.catch_all]
