"""The embedded stack with the pod token and callback signing on (as deployed): tasks still
flow, every callback verifies with the secret, and the pods refuse callers without the token."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import pytest

from sdeks.signing import verify_callback
from tests.e2e.test_pipeline import envelope

TIMEOUT_S = 240


@pytest.fixture
def signed_callbacks(local):
    """A queue on the callback topic with raw delivery: bodies and attributes as published."""
    assert local.resources
    sqs = local.client("sqs")
    url = sqs.create_queue(QueueName=f"lockdown-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns = local.client("sns")
    subscription = sns.subscribe(
        TopicArn=local.resources.callback_topic_arn,
        Protocol="sqs",
        Endpoint=arn,
        Attributes={"RawMessageDelivery": "true"},
    )["SubscriptionArn"]

    def wait_for(ids: set[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        deadline = time.monotonic() + TIMEOUT_S
        while set(found) != ids and time.monotonic() < deadline:
            answer = sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageAttributeNames=["All"],
            )
            for message in answer.get("Messages", []):
                body = json.loads(message["Body"])
                if body.get("id") in ids and body.get("status") != "running":
                    found[body["id"]] = message
        assert set(found) == ids, f"no terminal callback for {ids - set(found)}"
        return found

    yield wait_for
    sns.unsubscribe(SubscriptionArn=subscription)
    sqs.delete_queue(QueueUrl=url)


def test_tasks_flow_with_token_and_signing_and_callbacks_verify(
    local, client, signed_callbacks
) -> None:
    # GIVEN the local stack (pods require SDEKS_POD_TOKEN, callbacks are signed)
    assert local.pod_token and local.callback_secret
    good = f"lock-ok-{uuid.uuid4().hex[:8]}"
    bad = f"lock-bad-{uuid.uuid4().hex[:8]}"
    # WHEN a task renders on a pod, and another is refused by the dispatcher
    client.publish(envelope(good), runtime="sdruntime")
    rejected = envelope(bad)
    rejected["task"]["metadata"]["tasktype"] = "no-such-tasktype"
    client.publish(rejected, runtime="sdruntime")
    got = signed_callbacks({good, bad})
    # THEN the pod's callback (succeeded) and the dispatcher's (failed) both verify
    assert json.loads(got[good]["Body"])["status"] == "succeeded"
    assert json.loads(got[bad]["Body"])["error"]["code"] == "invalid_envelope"
    for message in got.values():
        assert verify_callback(local.callback_secret, message["Body"], message["MessageAttributes"])
        # ... and a changed body does not
        changed = message["Body"].replace('"id":', '"id" :', 1)
        assert changed != message["Body"]
        assert not verify_callback(local.callback_secret, changed, message["MessageAttributes"])


def _status(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_pods_of_the_local_stack_refuse_callers_without_the_token(local) -> None:
    (pod, *_) = local.pods["sdruntime"]
    job = json.dumps({"task": envelope("lock-direct")["task"]}).encode()
    json_type = {"Content-Type": "application/json"}
    assert _status(f"{pod.url}/v1/jobs", json_type, job) == 401
    assert _status(f"{pod.url}/v1/state") == 401
    assert _status(f"{pod.url}/health") == 200
    assert _status(f"{pod.url}/v1/state", local.pod_headers()) == 200


def test_local_console_reads_pod_state_with_the_token(local) -> None:
    # The console's fleet view asks each pod for /v1/state: it sends the stack's token.
    from sdeks.console.app import for_local_stack

    console = for_local_stack(local, read_only=True)
    try:
        pods = console.fleet()["pods"]["sdruntime"]
    finally:
        console.close()
    assert pods and all(p["reachable"] for p in pods), pods
