"""Publish a task with plain boto3 and wait for its callback — no sdeks code needed.

Run against the local stack (after `sdeks local up`, with its `export` lines
applied) or a deployed stack (with SDEKS_TASK_TOPIC_ARN/SDEKS_CALLBACK_TOPIC_ARN set):

    python examples/publish_boto3.py examples/text-to-image.json
    python examples/publish_boto3.py examples/legacy-a1111.json --runtime sdruntime

Every envelope shape works: `{"task": {...}}`, bare `{"metadata", "content"}`, the
legacy A1111 body (id in `alwayson_scripts.id_task`) and the serverless one (`id`,
`input`). The task is published under a fresh id (`<id>-<6 hex>`; `--keep-id` keeps
the file's): an id is single-use, so running this twice renders twice. It waits at
most `--timeout` seconds (exit 3), and exits 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

import boto3

TERMINAL = ("succeeded", "failed", "cancelled")


def task_id_of(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The dict that holds the id, and the id's key in it, for each envelope shape."""
    if "task" in body:
        return body["task"]["metadata"], "id"
    if "metadata" in body:
        return body["metadata"], "id"
    if "input" in body:
        return body, "id"
    return body["alwayson_scripts"], "id_task"


def runtime_of(body: dict[str, Any], default: str) -> str:
    """The `runtime` message attribute: the envelope's own, else `default`."""
    inner = body.get("task", body)
    metadata = inner.get("metadata") if isinstance(inner, dict) else None
    if isinstance(metadata, dict) and isinstance(metadata.get("runtime"), str):
        return str(metadata["runtime"])
    return default


def queue_policy(queue_arn: str, topic_arn: str) -> dict[str, Any]:
    """Lets the callback topic (and only it) send to the queue: real SNS delivers
    nothing to a queue without such a policy (the embedded stack does not check)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }
        ],
    }


def subscribe(sns: Any, sqs: Any, topic_arn: str, task_id: str) -> tuple[str, str]:
    """A queue that receives only this task's callbacks; returns (queue URL, subscription)."""
    queue_url = sqs.create_queue(QueueName=f"callbacks-{uuid.uuid4().hex[:16]}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sqs.set_queue_attributes(
        QueueUrl=queue_url, Attributes={"Policy": json.dumps(queue_policy(queue_arn, topic_arn))}
    )
    subscription = sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=queue_arn,
        Attributes={
            "RawMessageDelivery": "true",
            "FilterPolicyScope": "MessageBody",
            "FilterPolicy": json.dumps({"id": [task_id]}),
        },
        ReturnSubscriptionArn=True,
    )["SubscriptionArn"]
    return queue_url, subscription


def wait_for_callback(sqs: Any, queue_url: str, timeout_s: float) -> dict[str, Any] | None:
    """The terminal callback, or None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        got = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=max(1, min(20, int(left))))
        for message in got.get("Messages", []):
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            callback: dict[str, Any] = json.loads(message["Body"])
            if callback.get("status") in TERMINAL:
                return callback
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--runtime", default="sdruntime", help="for shapes that carry none")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait")
    parser.add_argument("--keep-id", action="store_true", help="publish under the file's id")
    args = parser.parse_args(argv)

    with open(args.file) as f:
        body = json.load(f)
    holder, key = task_id_of(body)
    if not args.keep_id:
        holder[key] = f"{holder.get(key) or 'task'}-{uuid.uuid4().hex[:6]}"
    task_id = holder[key]
    sns, sqs = boto3.client("sns"), boto3.client("sqs")

    # 1. Subscribe first, so the callback cannot slip past.
    queue_url, subscription = subscribe(sns, sqs, os.environ["SDEKS_CALLBACK_TOPIC_ARN"], task_id)
    try:
        # 2. Publish, with the `runtime` attribute that routes the task to its queue.
        sns.publish(
            TopicArn=os.environ["SDEKS_TASK_TOPIC_ARN"],
            Message=json.dumps(body),
            MessageAttributes={
                "runtime": {"DataType": "String", "StringValue": runtime_of(body, args.runtime)}
            },
        )
        print(f"published {task_id}", flush=True)
        # 3. Wait for the terminal callback.
        callback = wait_for_callback(sqs, queue_url, args.timeout)
    finally:
        sns.unsubscribe(SubscriptionArn=subscription)
        sqs.delete_queue(QueueUrl=queue_url)
    if callback is None:
        print(f"no callback for {task_id} within {args.timeout:.0f}s", file=sys.stderr)
        return 3
    print(json.dumps(callback, indent=2))
    return 0 if callback["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
