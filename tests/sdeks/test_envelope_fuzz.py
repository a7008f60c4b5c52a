"""Property-based fuzzing of message bodies: any input is a Task or an InvalidEnvelopeError."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdeks.envelope import Task, parse_task
from sdeks.errors import InvalidEnvelopeError

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
metadata_values = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=140), st.integers(), st.just("ok-id")),
        "runtime": st.one_of(st.text(max_size=45), st.just("sdruntime"), st.none()),
        "tasktype": st.one_of(
            st.sampled_from(["text-to-image", "image-to-image", "extra-single-image"]),
            st.text(max_size=20),
        ),
        "prefix": st.one_of(st.text(max_size=300), st.just("out/put"), st.just("../x")),
        "context": json_values,
        "webhook": st.one_of(st.text(max_size=40), st.just("https://x.test/h")),
    },
)
half_formed = st.one_of(
    st.builds(lambda m, c: {"task": {"metadata": m, "content": c}}, metadata_values, json_values),
    st.builds(lambda m, c: {"metadata": m, "content": c}, metadata_values, json_values),
    st.builds(
        lambda api, payload, wid: {"input": {"api": api, "payload": payload}, "id": wid},
        st.dictionaries(st.sampled_from(["method", "endpoint"]), st.text(max_size=30)),
        json_values,
        st.one_of(st.text(max_size=20), st.none()),
    ),
    st.builds(
        lambda scripts, rest: {"alwayson_scripts": scripts, **rest},
        st.dictionaries(
            st.sampled_from(["task", "id_task", "save_dir", "image_link", "sd_model_checkpoint"]),
            json_values,
        ),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    ),
    json_values,
)


def _check(body) -> None:
    try:
        task = parse_task(body, runtime="sdruntime", fallback_id="fallback-1")
    except InvalidEnvelopeError as exc:
        assert exc.code == "invalid_envelope"
        assert exc.message
        return
    assert isinstance(task, Task)
    # whatever was accepted is safe to use in S3 keys
    assert ".." not in task.id and "/" not in task.id
    assert not task.prefix.startswith("/") and ".." not in task.prefix.split("/")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(half_formed)
def test_any_document_is_a_task_or_invalid_envelope(body):
    _check(body)
    _check(json.dumps(body))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_any_bytes_are_a_task_or_invalid_envelope(raw):
    _check(raw)
