"""Topics and queues, with and without webhooks (the full stack is in test_stack.py)."""

from __future__ import annotations

import json

import aws_cdk as cdk
from aws_cdk.assertions import Template

from infra.images import REPO_ROOT
from infra.messaging import Messaging
from sdeks.names import StackNames

NAMES = StackNames("t")


def _template(*, webhooks: bool) -> tuple[Template, Messaging]:
    flags = json.loads((REPO_ROOT / "cdk.json").read_text())["context"]
    stack = cdk.Stack(cdk.App(context=flags), "Messaging")
    messaging = Messaging(stack, "Messaging", names=NAMES, runtimes=["sd"], webhooks=webhooks)
    return Template.from_stack(stack), messaging


def _queue_names(template: Template) -> set[str]:
    return {
        q["Properties"]["QueueName"] for q in template.find_resources("AWS::SQS::Queue").values()
    }


def test_messaging_without_webhooks_has_no_webhooks_queue() -> None:
    # GIVEN `webhooks: false` THEN nothing fills a queue no dispatcher reads
    template, messaging = _template(webhooks=False)
    assert messaging.webhooks is None
    assert _queue_names(template) == {
        NAMES.task_queue("sd"),
        NAMES.task_dlq("sd"),
        NAMES.catch_all_queue,
        NAMES.catch_all_dlq,
    }
    template.resource_count_is("AWS::SNS::Subscription", 2)  # task topic only


def test_messaging_with_webhooks_adds_one_queue_pair_on_the_callback_topic() -> None:
    template, messaging = _template(webhooks=True)
    assert messaging.webhooks is not None
    assert _queue_names(template) - _queue_names(_template(webhooks=False)[0]) == {
        NAMES.webhook_queue,
        NAMES.webhook_dlq,
    }
    # The webhooks queue is no task queue: the dispatcher never forwards tasks there.
    assert messaging.webhooks not in messaging.task_pairs
