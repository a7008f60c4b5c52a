"""Publish a task with plain boto3 and wait for its callback — no sdeks code needed.

Run against the local stack (after `sdeks local up`, with its `export` lines
applied) or a deployed stack (with SDEKS_TASK_TOPIC_ARN/SDEKS_CALLBACK_TOPIC_ARN set):

    python examples/publish_boto3.py examples/text-to-image.json
"""

from __future__ import annotations

import json
import os
import sys

import boto3

sns = boto3.client("sns")
sqs = boto3.client("sqs")

body = json.load(open(sys.argv[1]))
task_id = body["task"]["metadata"]["id"]

# 1. A queue that receives only this task's callbacks (filter on the body's id).
queue_url = sqs.create_queue(QueueName=f"callbacks-{task_id}")["QueueUrl"]
queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
    "QueueArn"
]
subscription = sns.subscribe(
    TopicArn=os.environ["SDEKS_CALLBACK_TOPIC_ARN"],
    Protocol="sqs",
    Endpoint=queue_arn,
    Attributes={
        "RawMessageDelivery": "true",
        "FilterPolicyScope": "MessageBody",
        "FilterPolicy": json.dumps({"id": [task_id]}),
    },
    ReturnSubscriptionArn=True,
)["SubscriptionArn"]

# 2. Publish, with the `runtime` attribute that routes the task to its queue.
sns.publish(
    TopicArn=os.environ["SDEKS_TASK_TOPIC_ARN"],
    Message=json.dumps(body),
    MessageAttributes={
        "runtime": {"DataType": "String", "StringValue": body["task"]["metadata"]["runtime"]}
    },
)

# 3. Wait for the terminal callback.
try:
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=20)
        for message in got.get("Messages", []):
            callback = json.loads(message["Body"])
            if callback["status"] in ("succeeded", "failed", "cancelled"):
                print(json.dumps(callback, indent=2))
                sys.exit(0 if callback["status"] == "succeeded" else 1)
finally:
    sns.unsubscribe(SubscriptionArn=subscription)
    sqs.delete_queue(QueueUrl=queue_url)
