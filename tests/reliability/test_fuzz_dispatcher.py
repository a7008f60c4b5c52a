"""Hostile message bodies through the dispatcher's real message path, property-based.

Each generated message is delivered the way real ones arrive - published to
the task topic with or without a `runtime` attribute, or sent raw to a queue
(as anyone allowed ``sqs:SendMessage`` can) - received from the moto server
and handed to `Dispatcher._handle`, the coroutine that owns one SQS message
from receipt to deletion. The dispatcher is the real one (aiobotocore
clients, task table, link resolver, router); only the pod is a double
(`tests.dispatcher.conftest.FakePod`, claiming and publishing through the
real `Reporter`), and the link resolver gets a resolver that knows no name,
so no generated link can reach beyond loopback.

The oracle is the contract: `unwrap_sns` + `parse_task` (fuzzed alone in
tests/sdeks/test_envelope_fuzz.py) say what each message is, and then

- not a task            -> one failed callback, code `invalid_envelope`, with the id if readable
- a task, unknown runtime -> one failed callback `unknown_runtime`
- a task, on the catch-all -> forwarded to its runtime queue, then as below
- a task                -> one terminal callback (succeeded from the pod, or a
                           `link_*`/`not_an_image` failure), unless its id already
                           ended: then nothing (the task table drops it)

and every message is deleted: nothing stays in flight, nothing is retried.
Afterwards a plain valid task still goes through.

Raw bodies nested far past Python's recursion limit and non-finite
`published_at` attributes are in the mix too (both once broke the dispatcher:
tests/reliability/test_found_bugs.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdeks.callback import Callback
from sdeks.envelope import Task, TaskType
from sdeks.names import REJECTED_PREFIX
from tests.reliability.harness import OUTPUT, RUNTIME, Delivery, Expected, Harness, plain_task

BATCH = 10
EXAMPLES = 102  # x BATCH messages, plus forwarded copies: over 1000 cases


# --- strategies ---------------------------------------------------------------------

# Raw SQS bodies must be XML-valid text; JSON documents are dumped as ASCII.
safe_chars = st.characters(min_codepoint=0x20, max_codepoint=0xD7FF) | st.sampled_from("\t\n\r")
junk_text = st.text(safe_chars, max_size=30)
huge_text = st.integers(10_000, 120_000).map(lambda n: "Z" * n)
#: Valid JSON that UTF-8 cannot encode (lone surrogates), and multi-byte text.
unencodable = st.sampled_from(["\ud800", "a\udfffb", "\ud83d", "x\udc00\ud800y"])
multibyte = st.text(st.sampled_from("\u732b\u00fc\u0390\U0001f408\u200b\ufeff"), max_size=20)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**80), 2**80)
    | st.sampled_from([10**40, -(10**40), 2**63, 2**64])
    | st.floats()  # NaN and Infinity too: Python's json reads them
    | st.text(max_size=20)
    | unencodable
    | multibyte
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | unencodable | multibyte, inner, max_size=4)
    ),
    max_leaves=16,
)
links = st.sampled_from(
    [
        "http://name.test/x.png",
        "https://10.0.0.1/x.png",
        "http://[::1]/x.png",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://0.0.0.0/x.png",
        "http://2130706433/x.png",
        "http://0x7f.1/x.png",
        "s3://not-allowed-bucket/x.png",
        f"s3://{OUTPUT}/missing.png",
        "file:///etc/passwd",
        "gopher://name.test/_x",
        "ftp://name.test/x.png",
    ]
)
ids = st.one_of(
    st.uuids().map(lambda u: f"fz-{u.hex[:16]}"),
    st.sampled_from(["fz-shared-1", "fz-shared-2", "a.b_c-D"]),
    st.sampled_from(["../../etc/passwd", "..", "a/b", "/abs", ".hidden", "x" * 129, "ü", ""]),
    st.integers(),
    junk_text,
    huge_text,
    st.none(),
)
runtimes = st.one_of(
    st.just(RUNTIME),
    st.sampled_from(["nosuch", "SDRUNTIME", "", "a" * 41, "bad runtime"]),
    json_values,
)
tasktypes = st.one_of(
    st.sampled_from(["text-to-image", "image-to-image", "extra-single-image"]),
    st.sampled_from(["txt2img", "video", ""]),
    json_values,
)
prefixes = st.one_of(
    st.sampled_from(["out", "a/b/c", "k=v/+x"]),
    st.sampled_from(["../x", "/abs", "a//b", "a/./b", "a/../../b", "rejected/x", "%2e%2e", "a\\b"]),
    huge_text,
    json_values,
)
numbers = st.one_of(
    st.integers(-5, 100),
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**63, 10**30, 10**40, 65, 1e308, -0.0, True, 20.5, 2.0]),
    st.floats(),
    junk_text,
)
contents = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.one_of(junk_text, huge_text, links, json_values),
            "negative_prompt": junk_text,
            "steps": numbers,
            "width": numbers,
            "height": numbers,
            "batch_size": numbers,
            "n_iter": numbers,
            "seed": numbers,
            "cfg_scale": numbers,
            "init_images": st.one_of(
                st.lists(st.one_of(links, junk_text), max_size=3),
                links,
                json_values,
                # one link repeated: counted per occurrence
                st.builds(lambda link, n: [link] * n, links, st.integers(2, 40)),
            ),
            "mask": st.one_of(links, junk_text),
            "alwayson_scripts": st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={"sd_model_checkpoint": st.one_of(junk_text, huge_text, json_values)},
                ),
                json_values,
            ),
            "override_settings": st.one_of(
                st.dictionaries(st.text(max_size=10), json_values, max_size=3)
            ),
            "context_junk": json_values,
        },
    ),
    json_values,
)
metadata = st.fixed_dictionaries(
    {},
    optional={
        "id": ids,
        "runtime": runtimes,
        "tasktype": tasktypes,
        "prefix": prefixes,
        "context": st.one_of(json_values, huge_text),
        "webhook": st.one_of(
            st.sampled_from(["https://hooks.test/h", "http://10.0.0.1/h", "ftp://x"]), json_values
        ),
    },
)
valid_tasks = st.builds(
    lambda u, model, n, link: Task(
        id=f"fz-ok-{u.hex[:16]}",
        runtime=RUNTIME,
        tasktype=TaskType.IMAGE_TO_IMAGE if link else TaskType.TEXT_TO_IMAGE,
        prefix="fuzz",
        context={"n": n},
        content={
            "prompt": "a cat",
            "steps": 2,
            "alwayson_scripts": {"sd_model_checkpoint": model},
            **({"init_images": [link]} if link else {}),
        },
    ).to_envelope(),
    st.uuids(),
    st.sampled_from(["tiny-sd15", "other-model", "v1-5-pruned-emaonly.safetensors [6ce0161689]"]),
    st.integers(0, 10),
    st.one_of(st.none(), links),
)


def _mutate(task: dict[str, Any], where: str, key: str, value: Any) -> dict[str, Any]:
    inner = task["task"][where]
    if value is _DROP:
        inner.pop(key, None)
    else:
        inner[key] = value
    return task


_DROP = object()
#: A valid task with one metadata or content field replaced (or dropped): half-formed.
near_valid = st.one_of(
    st.builds(
        _mutate,
        valid_tasks,
        st.just("metadata"),
        st.sampled_from(["id", "runtime", "tasktype", "prefix", "context", "webhook"]),
        st.one_of(st.just(_DROP), ids, runtimes, tasktypes, prefixes, json_values),
    ),
    st.builds(
        _mutate,
        valid_tasks,
        st.just("content"),
        st.sampled_from(
            ["prompt", "steps", "width", "batch_size", "seed", "init_images", "alwayson_scripts"]
        ),
        st.one_of(st.just(_DROP), numbers, links, huge_text, json_values, unencodable, multibyte),
    ),
)


def near_limit(task: dict[str, Any], slack: int, char: str) -> str:
    """`task` with a context of `char` padding its UTF-8 body to `slack` bytes under SNS's
    limit (the `runtime` attribute counted too): its callback echoing it cannot fit."""
    task["task"]["metadata"]["context"] = {"pad": ""}
    base = len(json.dumps(task, ensure_ascii=False).encode())
    room = 262_144 - len("runtimeStringsdruntime") - slack - base
    width = len(char.encode())
    task["task"]["metadata"]["context"] = {"pad": char * (room // width) + "x" * (room % width)}
    return json.dumps(task, ensure_ascii=False)


near_limit_bodies = st.builds(
    near_limit,
    valid_tasks,
    st.integers(0, 64),
    st.sampled_from(["x", "\u00fc", "\u732b", "\U0001f408"]),
)
documents = st.one_of(
    valid_tasks,
    near_valid,
    near_valid,
    st.builds(lambda m, c: {"task": {"metadata": m, "content": c}}, metadata, contents),
    st.builds(
        lambda m, c, extra: {"task": {"metadata": m, "content": c}, **extra},
        metadata,
        contents,
        st.dictionaries(st.text(min_size=1, max_size=6), json_values, min_size=1, max_size=2),
    ),
    st.builds(lambda m, c: {"metadata": m, "content": c}, metadata, contents),
    st.builds(lambda t: {"task": t}, json_values),
    st.builds(
        lambda api, payload, extra: {"input": {"api": api, "payload": payload}, **extra},
        st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "method": st.sampled_from(["POST", "post", "GET", ""]),
                    "endpoint": st.sampled_from(
                        [
                            "/sdapi/v1/txt2img",
                            "/sdapi/v1/img2img",
                            "/sdapi/v1/extra-single-image",
                            "/x",
                        ]
                    ),
                },
            ),
            json_values,
        ),
        contents,
        st.fixed_dictionaries(
            {},
            optional={
                "id": ids,
                "webhook": st.one_of(st.none(), junk_text),
                "runtime": runtimes,
                "prefix": prefixes,
            },
        ),
    ),
    st.builds(
        lambda scripts, content: {
            **(content if isinstance(content, dict) else {}),
            "alwayson_scripts": scripts,
        },
        st.fixed_dictionaries(
            {},
            optional={
                "task": tasktypes,
                "id_task": ids,
                "save_dir": prefixes,
                "image_link": st.one_of(links, json_values),
                "sd_model_checkpoint": st.one_of(junk_text, json_values),
                "runtime": runtimes,
            },
        ),
        contents,
    ),
    json_values,
)


def nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


def deep_task(depth: int, kind: str) -> str:
    """A task whose prompt nests `depth` levels: over the envelope's limit of 64."""
    head = '{"task": {"metadata": {"id": "fz-deep", "runtime": "sdruntime", '
    head += '"tasktype": "text-to-image", "prefix": "p"}, "content": {"prompt": '
    return head + nested(depth, kind) + "}}}"


def bodies(max_depth: int) -> st.SearchStrategy[str]:
    """Message bodies (the SNS message, or the raw SQS body), nesting at most `max_depth`."""
    return st.one_of(
        documents.map(json.dumps),
        junk_text.filter(bool),
        st.sampled_from(["{", "null", "[]", '"task"', "{}", '{"task": null}', "\ufeff{}", "NaN"]),
        huge_text,
        st.builds(nested, st.integers(2, max_depth), st.sampled_from(["list", "dict"])),
        st.builds(deep_task, st.integers(65, max_depth), st.sampled_from(["list", "dict"])),
    )


fake_notifications = st.builds(
    lambda message, attrs, mid, stamp: json.dumps(
        {
            "Type": "Notification",
            "Message": message,
            "MessageAttributes": attrs,
            "MessageId": mid,
            "Timestamp": stamp,
        }
    ),
    st.one_of(bodies(200), json_values),
    st.one_of(
        st.dictionaries(
            st.sampled_from(["runtime", "published_at", "x"]),
            st.one_of(
                st.fixed_dictionaries(
                    {"Type": st.just("String"), "Value": st.one_of(runtimes, junk_text)}
                ),
                json_values,
            ),
            max_size=2,
        ),
        json_values,
    ),
    st.one_of(st.uuids().map(str), json_values),
    st.one_of(
        st.sampled_from(
            [
                "2024-05-01T10:00:00.000Z",
                "0001-01-01T00:00:00Z",
                "9999-12-31T23:59:59Z",
                "yesterday",
            ]
        ),
        json_values,
    ),
)
stamps = st.one_of(
    st.floats(min_value=-1e12, max_value=1e20, allow_nan=False).map(repr),
    st.sampled_from(["0", "-1", "1700000000.5", "abc", "", "inf", "-inf", "nan", "1e400"]),
)


deliveries = st.one_of(
    st.builds(
        lambda body, attr: Delivery(body, "sns", attribute=attr),
        bodies(600),
        st.sampled_from([RUNTIME, RUNTIME, None, "nosuch", "Bad Runtime!"]),
    ),
    # several values, or a number: matches a runtime queue and the catch-all at once
    st.builds(
        lambda body, attr: Delivery(body, "sns", attribute=attr[1], attribute_type=attr[0]),
        bodies(100),
        st.sampled_from(
            [
                ("String.Array", json.dumps([RUNTIME, "other"])),
                ("String.Array", json.dumps([RUNTIME])),
                ("String.Array", json.dumps(["nosuch", RUNTIME, RUNTIME])),
                ("Number", "7"),
            ]
        ),
    ),
    st.builds(lambda body: Delivery(body, "sns", attribute=RUNTIME), near_limit_bodies),
    st.builds(
        lambda body, queue, attrs: Delivery(body, "sqs", queue=queue, sqs_attributes=attrs),
        st.one_of(
            bodies(200),
            fake_notifications,
            # far deeper than any parser's recursion limit (unwrap_sns reads raw bodies)
            st.builds(nested, st.integers(1_000, 60_000), st.sampled_from(["list", "dict"])),
        ),
        st.sampled_from([RUNTIME, "catch-all"]),
        st.fixed_dictionaries(
            {},
            optional={
                "runtime": st.sampled_from([RUNTIME, "nosuch", "x y"]),
                "published_at": stamps,
            },
        ),
    ),
)


def check_batch(expected: list[Expected], callbacks: list[Callback]) -> None:
    for callback in callbacks:
        assert callback.status in ("succeeded", "failed"), callback
        assert callback.result is (callback.status == "succeeded"), callback
        if callback.status == "failed":
            assert callback.error is not None and callback.error.code and callback.error.message
    # Every id: exactly the one terminal callback its messages call for.
    wanted = {e.task_id: e.outcomes for e in expected if e.task_id is not None and e.outcomes}
    got: dict[str | None, list[tuple[str, str | None]]] = {}
    for callback in callbacks:
        code = callback.error.code if callback.error else None
        got.setdefault(callback.id, []).append((callback.status.value, code))
    anonymous = got.pop(None, [])
    assert sorted(got) == sorted(wanted), (wanted, got)
    for task_id, outcomes in got.items():
        assert len(outcomes) == 1 and outcomes[0] in wanted[task_id], (task_id, outcomes)
    # Refusals without an id (none readable, or it named another task's id): as many as
    # expected, per code, the optional ones maybe not.
    for outcome in {o for e in expected if e.task_id is None for o in e.outcomes or ()}:
        mine = [e for e in expected if e.task_id is None and e.outcomes == frozenset({outcome})]
        low = sum(not e.optional for e in mine)
        assert low <= anonymous.count(outcome) <= len(mine), (outcome, low, len(mine), anonymous)
    assert all(
        any(e.task_id is None and o in (e.outcomes or ()) for e in expected) for o in anonymous
    ), anonymous


# --- the tests ----------------------------------------------------------------------


# Over 1000 messages through moto: about 3 minutes on an idle 2-core machine, more
# while the rest of the suite shares it; the suite's 300 s would cut it short.
@pytest.mark.timeout(900)
def test_fuzz_every_message_becomes_a_task_or_a_failed_callback(aws, stack):
    runner = asyncio.Runner()
    harness = Harness(aws, stack)
    runner.run(harness.start())
    try:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(deliveries, min_size=BATCH, max_size=BATCH))
        def batch(items: list[Delivery]) -> None:
            delivered = harness.deliver(items)
            expected = runner.run(harness.handle_all())
            assert len(expected) >= delivered
            check_batch(expected, harness.callbacks())
            # Nothing left in flight: every message was deleted, none awaits a retry.
            assert harness.in_flight() == 0
            assert len(harness.leases) == 0
            assert not any(harness.router.waiting.values())

        batch()

        # The dispatcher still serves: a plain valid task goes through.
        task_id = f"fz-after-{uuid.uuid4().hex[:8]}"
        body = plain_task(task_id, prefix="fuzz", prompt="still alive")
        assert harness.deliver([Delivery(json.dumps(body), "sns", attribute=RUNTIME)]) == 1
        runner.run(harness.handle_all())
        (after,) = harness.callbacks()
        assert (after.id, after.status) == (task_id, "succeeded")
    finally:
        runner.run(harness.close())
        runner.close()

    # Every rejected message's raw body is kept for audit.
    kept = sum(
        page.get("KeyCount", 0)
        for page in aws.s3.get_paginator("list_objects_v2").paginate(
            Bucket=stack.output_bucket, Prefix=REJECTED_PREFIX
        )
    )
    assert kept == harness.rejected
    print(f"fuzz: {harness.handled} messages handled: {dict(harness.kinds)}")
    assert harness.handled >= 1000
