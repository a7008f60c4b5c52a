"""Topics and queues: the task topic fans out to a queue per runtime plus the catch-all;
the callback topic feeds the `webhooks` queue (terminal callbacks, for the dispatcher).

Mirrors `sdeks.resources.create_stack_resources` (the local stack): same names,
same filter policies, same redrive, same visibility timeouts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    MESSAGE_RETENTION_S,
    VISIBILITY_TIMEOUT_S,
    WEBHOOK_VISIBILITY_TIMEOUT_S,
    StackNames,
    catch_all_filter_policy,
    runtime_filter_policy,
)
from sdeks.webhooks import WEBHOOK_FILTER_POLICY

_RETENTION = Duration.seconds(MESSAGE_RETENTION_S)


@dataclass(frozen=True)
class QueuePair:
    """A queue and the DLQ it redrives to after `MAX_RECEIVE_COUNT` receives."""

    queue: sqs.Queue
    dlq: sqs.Queue


def _filter(policy: Mapping[str, Sequence[Any]]) -> dict[str, sns.SubscriptionFilter]:
    # The policy dicts in sdeks.names are the wire form; SubscriptionFilter takes them as is,
    # so the deployed policy is exactly what the local stack (and its tests) use.
    return {attr: sns.SubscriptionFilter(conditions=list(conds)) for attr, conds in policy.items()}


class Messaging(Construct):
    """Task topic, per-runtime queues, catch-all, the callback topic and (with `webhooks`)
    the webhooks queue, each queue with a DLQ, all KMS-encrypted.

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
        webhooks: bool,
    ) -> None:
        super().__init__(scope, id)
        # Two keys, not one: the queue key's policy names the topics (SNS may encrypt into
        # the queues only on behalf of the topic it delivers for), and the topics are
        # encrypted with their key, so one shared key would be a circular dependency.
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

        self.runtime_queues: dict[str, QueuePair] = {}
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

        # Terminal callbacks, whoever publishes them, for the dispatcher to POST to task
        # webhooks. Its subscription adds the callback topic to the queue key's policy:
        # no cycle, since the callback topic is encrypted with the topic key.
        self.webhooks: QueuePair | None = None
        if webhooks:
            self.webhooks = self._queue_pair(
                "Webhooks",
                names.webhook_queue,
                names.webhook_dlq,
                # One delivery with all its retries fits in it (the dispatcher holds a
                # lease beyond that anyway).
                visibility_timeout_s=WEBHOOK_VISIBILITY_TIMEOUT_S,
            )
            self.callback_topic.add_subscription(
                subs.SqsSubscription(
                    self.webhooks.queue, filter_policy=_filter(WEBHOOK_FILTER_POLICY)
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

    def _queue_pair(
        self,
        id: str,
        name: str,
        dlq_name: str,
        *,
        visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
    ) -> QueuePair:
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
            visibility_timeout=Duration.seconds(visibility_timeout_s),
            dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=MAX_RECEIVE_COUNT),
            **common,
        )
        return QueuePair(queue=queue, dlq=dlq)

    @property
    def task_pairs(self) -> list[QueuePair]:
        """The queues tasks arrive on: one per runtime, then the catch-all."""
        return [*self.runtime_queues.values(), self.catch_all]
