"""examples/publish_boto3.py's parts on moto: each envelope shape, the queue policy
real SNS needs (the same as `sdeks.client`'s), and its timeout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sdeks.client import topic_delivery_policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("publish_boto3", EXAMPLES / "publish_boto3.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "task_id", "runtime"),
    [
        ("text-to-image.json", "demo-t2i", "sdruntime"),
        ("image-to-image.json", "demo-i2i-s3", "sdruntime"),
        ("legacy-a1111.json", "demo-legacy", "fallback"),
        ("serverless-txt2img.json", "demo-serverless", "fallback"),
    ],
)
def test_every_example_shape_gives_its_id_and_runtime(example, name, task_id, runtime):
    body = json.loads((EXAMPLES / name).read_text())
    holder, key = example.task_id_of(body)
    assert holder[key] == task_id
    assert example.runtime_of(body, "fallback") == runtime


def test_bare_metadata_shape(example):
    body = {"metadata": {"id": "bare", "runtime": "rt"}, "content": {}}
    holder, key = example.task_id_of(body)
    assert (holder[key], example.runtime_of(body, "x")) == ("bare", "rt")


def test_subscribe_sets_the_queue_policy_sns_needs(example, aws, stack):
    queue_url, subscription = example.subscribe(aws.sns, aws.sqs, stack.callback_topic_arn, "x")
    try:
        attrs = aws.sqs.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["Policy", "QueueArn"]
        )["Attributes"]
        assert json.loads(attrs["Policy"]) == topic_delivery_policy(
            attrs["QueueArn"], stack.callback_topic_arn
        )
    finally:
        aws.sns.unsubscribe(SubscriptionArn=subscription)
        aws.sqs.delete_queue(QueueUrl=queue_url)


def test_wait_for_callback_gives_up_after_its_timeout(example, aws):
    queue_url = aws.sqs.create_queue(QueueName="example-timeout")["QueueUrl"]
    try:
        assert example.wait_for_callback(aws.sqs, queue_url, timeout_s=0.5) is None
    finally:
        aws.sqs.delete_queue(QueueUrl=queue_url)
