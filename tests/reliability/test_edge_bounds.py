"""Issue 14: every message ends in exactly one correct terminal callback, whatever the
input. One regression test per class of input that once ended in no callback, a
callback too big to publish, or two callbacks for one id; each through the real
dispatcher message path on moto (`tests.reliability.harness`), the pod a double.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import pytest_asyncio

from sdeks.callback import CONTEXT_MARKER, MAX_SNS_MESSAGE_BYTES
from sdeks.tasks import TaskTable
from tests.reliability.harness import RUNTIME, Delivery, Harness, plain_task

# One dispatcher for the module (starting one costs seconds on a busy machine).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_harness(aws):
    from sdeks.names import StackNames
    from sdeks.resources import create_stack_resources

    stack = create_stack_resources(
        sns=aws.sns,
        sqs=aws.sqs,
        s3=aws.s3,
        dynamodb=aws.dynamodb,
        runtimes=[RUNTIME],
        names=StackNames(prefix=f"t{uuid.uuid4().hex[:10]}"),
    )
    harness = Harness(aws, stack)
    await harness.start()
    yield harness
    await harness.close()


@pytest_asyncio.fixture(loop_scope="module")
async def harness(shared_harness):
    shared_harness.callbacks()  # nothing left over from an earlier test
    shared_harness.pod.jobs.clear()
    return shared_harness


def _id(kind: str) -> str:
    return f"e14-{kind}-{uuid.uuid4().hex[:8]}"


def _task(task_id: str, **content: Any) -> dict[str, Any]:
    body = plain_task(task_id, prefix="edge")
    body["task"]["content"].update(content)
    return body


async def _one(harness: Harness, body: dict[str, Any] | str, **delivery: Any) -> list[Any]:
    text = body if isinstance(body, str) else json.dumps(body)
    assert harness.deliver([Delivery(text, "sns", attribute=RUNTIME, **delivery)]) == 1
    await harness.handle_all()
    assert harness.in_flight() == 0
    return harness.callbacks()


def _codes(callbacks: list[Any]) -> list[tuple[str | None, str, str | None]]:
    return [(c.id, c.status.value, c.error.code if c.error else None) for c in callbacks]


# 1. Text UTF-8 cannot encode ----------------------------------------------------------


@pytest.mark.parametrize("where", ["prompt", "key", "context"])
async def test_lone_surrogate_is_refused_with_one_serialisable_callback(harness, where):
    task_id = _id("sur")
    body = _task(task_id)
    if where == "prompt":
        body["task"]["content"]["prompt"] = "a cat \ud800"
    elif where == "key":
        body["task"]["content"]["override_settings"] = {"\udfff": 1}
    else:
        body["task"]["metadata"]["context"] = {"note": "x\ud83d"}
    # json.dumps escapes the surrogate: valid JSON that SNS carries as it is
    callbacks = await _one(harness, body)
    assert _codes(callbacks) == [(task_id, "failed", "invalid_parameter")]
    assert "lone surrogate" in callbacks[0].error.message
    assert harness.pod.jobs == []  # never forwarded to a pod
    if where == "context":  # what is echoed is scrubbed, so the failure itself serialises
        assert callbacks[0].context == {"note": "x\ufffd"}


# 2. Error messages quote a short excerpt only ------------------------------------------


async def test_error_messages_quote_a_bounded_excerpt(harness):
    task_id = _id("msg")
    body = _task(task_id)
    # backslashes (repr doubles them), and a method whose upper() triples in length
    body["task"]["metadata"]["tasktype"] = "\\" * 100_000
    callbacks = await _one(harness, body)
    assert _codes(callbacks) == [(task_id, "failed", "invalid_envelope")]
    assert len(callbacks[0].error.message) < 1_000
    serverless = {
        "id": _id("sl"),
        "input": {"api": {"method": "\u0390" * 30_000, "endpoint": "/x"}, "payload": {}},
    }
    (callback,) = await _one(harness, serverless)
    assert callback.error.code == "invalid_envelope" and len(callback.error.message) < 1_000


# 3. Callbacks measured in bytes against SNS's limit -----------------------------------


async def test_multibyte_context_near_the_limit_gets_a_fitted_callback(harness, aws):
    task_id = _id("ctx")
    body = _task(task_id)
    # 3-byte characters up to a few bytes under 256 KiB: the task fits SNS (counted in
    # bytes, not characters), its callback echoing the context beside ~600 bytes does not
    body["task"]["metadata"]["context"] = {"text": ""}
    room = MAX_SNS_MESSAGE_BYTES - len(json.dumps(body).encode()) - len("runtime") - 20
    body["task"]["metadata"]["context"] = {"text": "\u732b" * (room // 3)}
    text = json.dumps(body, ensure_ascii=False)
    assert MAX_SNS_MESSAGE_BYTES - 40 < len(text.encode()) < MAX_SNS_MESSAGE_BYTES
    callbacks = await _one(harness, text)
    assert _codes(callbacks) == [(task_id, "succeeded", None)]
    assert set(callbacks[0].context) == {CONTEXT_MARKER}
    assert callbacks[0].context[CONTEXT_MARKER]["bytes"] > 250_000
    # the claim stored the fitted callback: a republish would fit too
    record = await TaskTable(aws.dynamodb, harness.stack.task_table).get(task_id)
    stored = record.terminal_callback()
    assert stored is not None and stored.sns_size() <= MAX_SNS_MESSAGE_BYTES


# 4. Numbers checked before anything is stored or forwarded ------------------------------


@pytest.mark.parametrize(
    "content",
    [
        {"steps": 10**40},
        {"steps": True},
        {"steps": 20.5},
        {"n_iter": 10**6, "batch_size": 10**6},
        {"width": -64},
        {"seed": 2**64 - 1, "batch_size": 4},
        {"cfg_scale": float("inf")},
        {"extra": 10**30},
    ],
)
async def test_absurd_numbers_end_at_once_with_invalid_parameter(harness, aws, content):
    task_id = _id("num")
    callbacks = await _one(harness, _task(task_id, **content))
    assert _codes(callbacks) == [(task_id, "failed", "invalid_parameter")]
    assert harness.pod.jobs == []
    record = await TaskTable(aws.dynamodb, harness.stack.task_table).get(task_id)
    assert record is not None and record.attempts == 0  # never recorded as queued


# 5. Full-string patterns ----------------------------------------------------------------


@pytest.mark.parametrize("field", ["id", "prefix", "runtime"])
async def test_trailing_newline_is_not_a_valid_name(harness, field):
    task_id = _id("nl")
    body = _task(task_id)
    body["task"]["metadata"][field] = body["task"]["metadata"][field] + "\n"
    callbacks = await _one(harness, body)
    assert [(c.status.value, c.error.code) for c in callbacks] == [("failed", "invalid_envelope")]
    assert harness.pod.jobs == []


# 6. No second terminal callback for an id in flight -------------------------------------


async def test_invalid_message_naming_a_task_in_flight_leaves_that_task_alone(harness):
    task_id = _id("dup")
    # GIVEN a valid task, admitted (queued in the task table) ...
    valid = Delivery(json.dumps(plain_task(task_id, prefix="edge")), "sns", attribute=RUNTIME)
    invalid_body = plain_task(task_id, prefix="edge")
    invalid_body["task"]["metadata"]["tasktype"] = "video"
    invalid = Delivery(json.dumps(invalid_body), "sns", attribute=RUNTIME)
    from sdeks.envelope import parse_task

    await harness.reporter.admit(parse_task(valid.body))
    # WHEN an invalid message naming its id, then the valid one, are handled
    assert harness.deliver([invalid]) == 1
    await harness.handle_all()
    assert harness.deliver([valid]) == 1
    await harness.handle_all()
    callbacks = harness.callbacks()
    # THEN the id gets exactly one terminal callback, the valid task's; the invalid
    # message's failure carries no id, but the id it named and its message id
    assert [c.status.value for c in callbacks if c.id == task_id] == ["succeeded"]
    (refused,) = [c for c in callbacks if c.id is None]
    assert refused.error.code == "invalid_envelope"
    assert refused.named_id == task_id and refused.message_id


# 9. A runtime attribute with several values ---------------------------------------------


@pytest.mark.parametrize(
    "attribute",
    [
        {"DataType": "String.Array", "StringValue": json.dumps([RUNTIME, "other"])},
        {"DataType": "String.Array", "StringValue": json.dumps([RUNTIME])},
        {"DataType": "Number", "StringValue": "5"},
    ],
)
async def test_multi_valued_runtime_attribute_renders_once(harness, aws, attribute):
    task_id = _id("arr")
    aws.sns.publish(
        TopicArn=harness.stack.task_topic_arn,
        Message=json.dumps(plain_task(task_id, prefix="edge")),
        MessageAttributes={"runtime": attribute},
    )
    await harness.handle_all()
    assert harness.in_flight() == 0
    assert _codes(harness.callbacks()) == [(task_id, "succeeded", None)]
    assert [j.task.id for j in harness.pod.jobs] == [task_id]  # rendered once
