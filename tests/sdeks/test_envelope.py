"""The task envelope: every accepted shape, and hostile ids, prefixes and bodies."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from sdeks.envelope import (
    MAX_BODY_BYTES,
    Task,
    TaskType,
    best_effort_id,
    parse_task,
    unwrap_sns,
)
from sdeks.errors import InvalidEnvelopeError

CANONICAL = {
    "task": {
        "metadata": {
            "id": "test-i2i",
            "runtime": "sdruntime",
            "tasktype": "image-to-image",
            "prefix": "output",
            "context": {"any": ["json", 1, None]},
        },
        "content": {
            "prompt": "cat wizard",
            "steps": 16,
            "init_images": ["https://example.test/cat.png"],
            "alwayson_scripts": {"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors"},
        },
    }
}


def test_parse_canonical_envelope():
    task = parse_task(json.dumps(CANONICAL))
    assert task.id == "test-i2i"
    assert task.runtime == "sdruntime"
    assert task.tasktype is TaskType.IMAGE_TO_IMAGE
    assert task.prefix == "output"
    assert task.context == {"any": ["json", 1, None]}
    assert task.model == "v1-5-pruned-emaonly.safetensors"
    assert task.output_location("bucket") == "s3://bucket/output/test-i2i"


def test_parse_bare_envelope_equals_wrapped():
    assert parse_task(CANONICAL["task"]) == parse_task(CANONICAL)


def test_to_envelope_round_trips():
    task = parse_task(CANONICAL)
    assert parse_task(task.to_envelope()) == task


def test_model_falls_back_to_override_settings_then_none():
    body = json.loads(json.dumps(CANONICAL))
    del body["task"]["content"]["alwayson_scripts"]
    body["task"]["content"]["override_settings"] = {"sd_model_checkpoint": "other [abc123]"}
    assert parse_task(body).model == "other [abc123]"
    del body["task"]["content"]["override_settings"]
    assert parse_task(body).model is None


def test_parse_legacy_a1111_body():
    legacy = {
        "alwayson_scripts": {
            "task": "image-to-image",
            "image_link": "https://example.test/cat.png",
            "id_task": "test-i2i",
            "sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors",
            "save_dir": "legacy/out",
        },
        "prompt": "cat wizard",
        "steps": 16,
    }
    task = parse_task(legacy, runtime="sdruntime")
    assert (task.id, task.runtime, task.tasktype, task.prefix) == (
        "test-i2i",
        "sdruntime",
        TaskType.IMAGE_TO_IMAGE,
        "legacy/out",
    )
    assert task.content["init_images"] == ["https://example.test/cat.png"]
    assert task.model == "v1-5-pruned-emaonly.safetensors"
    assert "id_task" not in task.content["alwayson_scripts"]


def test_parse_serverless_envelope_uses_fallback_id_and_webhook():
    body = {
        "webhook": "https://hooks.example.test/cb",
        "input": {
            "api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"},
            "payload": {"prompt": "an astronaut riding a horse", "seed": -1},
        },
    }
    task = parse_task(body, runtime="sdruntime", fallback_id="0f3c-msg-id")
    assert task.id == "0f3c-msg-id"
    assert task.tasktype is TaskType.TEXT_TO_IMAGE
    assert task.webhook == "https://hooks.example.test/cb"
    assert task.content["prompt"] == "an astronaut riding a horse"
    assert task.prefix == "output"


def test_serverless_envelope_rejects_unknown_endpoint():
    body = {"input": {"api": {"method": "GET", "endpoint": "/sdapi/v1/options"}, "payload": {}}}
    with pytest.raises(InvalidEnvelopeError, match="input.api"):
        parse_task(body, runtime="sdruntime", fallback_id="x")


@pytest.mark.parametrize(
    "bad_id",
    [
        "../../etc/passwd",
        "a/b",
        "..",
        "a..b",
        "-leading-dash",
        ".hidden",
        "",
        "x" * 129,
        "spa ce",
        "nul\x00byte",
        "ünïcode",
        "a\nb",
    ],
)
def test_hostile_ids_are_rejected(bad_id):
    body = json.loads(json.dumps(CANONICAL))
    body["task"]["metadata"]["id"] = bad_id
    with pytest.raises(InvalidEnvelopeError, match="id"):
        parse_task(body)


@pytest.mark.parametrize(
    "bad_prefix",
    [
        "/abs",
        "../up",
        "a/../b",
        "a//b",
        "a/./b",
        "trailing/",
        "",
        "x" * 257,
        "back\\slash",
        "rejected",
        "rejected/x",
        "white space",
    ],
)
def test_hostile_prefixes_are_rejected(bad_prefix):
    body = json.loads(json.dumps(CANONICAL))
    body["task"]["metadata"]["prefix"] = bad_prefix
    with pytest.raises(InvalidEnvelopeError, match="prefix"):
        parse_task(body)


def test_nested_prefix_is_accepted():
    body = json.loads(json.dumps(CANONICAL))
    body["task"]["metadata"]["prefix"] = "team-a/2026=11/run_1"
    assert parse_task(body).prefix == "team-a/2026=11/run_1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("runtime", "Not_A_DNS_Label"),
        ("runtime", 7),
        ("tasktype", "video"),
        ("webhook", "ftp://example.test/x"),
        ("webhook", "file:///etc/passwd"),
    ],
)
def test_bad_metadata_fields_are_rejected_with_the_field_name(field, value):
    body = json.loads(json.dumps(CANONICAL))
    body["task"]["metadata"][field] = value
    with pytest.raises(InvalidEnvelopeError, match=field):
        parse_task(body)


@pytest.mark.parametrize("missing", ["id", "runtime", "tasktype", "prefix"])
def test_missing_required_metadata_is_named(missing):
    body = json.loads(json.dumps(CANONICAL))
    del body["task"]["metadata"][missing]
    with pytest.raises(InvalidEnvelopeError, match=f"{missing}: required"):
        parse_task(body)


def test_invalid_envelope_carries_the_id_when_readable():
    body = json.loads(json.dumps(CANONICAL))
    body["task"]["metadata"]["tasktype"] = "video"
    with pytest.raises(InvalidEnvelopeError) as info:
        parse_task(body)
    assert info.value.task_id == "test-i2i"
    assert info.value.code == "invalid_envelope"


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"task": []}',
        b'{"task": {"metadata": "x"}}',
        b'{"task": {"metadata": {}, "content": []}}',
        b'{"something": "else"}',
        b'{"task": {"metadata": {}}, "extra": 1}',
        b"\xff\xfe garbage",
    ],
)
def test_non_tasks_raise_invalid_envelope(raw):
    with pytest.raises(InvalidEnvelopeError):
        parse_task(raw)


def test_deep_nesting_and_huge_bodies_are_refused():
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(InvalidEnvelopeError, match="nests deeper|not valid JSON"):
        parse_task(deep)
    with pytest.raises(InvalidEnvelopeError, match="bytes, over"):
        parse_task(b" " * (MAX_BODY_BYTES + 1))


def test_best_effort_id_only_returns_safe_ids():
    assert best_effort_id({"task": {"metadata": {"id": "ok-1"}}}) == "ok-1"
    assert best_effort_id({"task": {"metadata": {"id": "../x"}}}) is None
    assert best_effort_id({"alwayson_scripts": {"id_task": "legacy"}}) == "legacy"
    assert best_effort_id(["not", "a", "dict"]) is None


def test_unwrap_sns_notification_reads_attributes_and_timestamp():
    wrapped = json.dumps(
        {
            "Type": "Notification",
            "MessageId": "m-1",
            "Message": json.dumps(CANONICAL),
            "Timestamp": "2026-11-21T05:00:00.000Z",
            "MessageAttributes": {"runtime": {"Type": "String", "Value": "sdruntime"}},
        }
    )
    note = unwrap_sns(wrapped)
    assert note.runtime == "sdruntime"
    assert note.message_id == "m-1"
    assert note.published_at == datetime(2026, 11, 21, 5, tzinfo=UTC).timestamp()
    assert isinstance(parse_task(note.body, runtime=note.runtime), Task)


def test_unwrap_sns_passes_raw_bodies_through():
    assert unwrap_sns("plain text").body == "plain text"
    assert unwrap_sns('{"Type": "Other"}').body == '{"Type": "Other"}'
