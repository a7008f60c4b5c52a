"""sdeks.bounds and the callback fitting rule: pure checks, no AWS (issue 14)."""

from __future__ import annotations

import json

import pytest

from sdeks.bounds import check_content, check_text, escape, excerpt, find_unencodable, scrub
from sdeks.callback import (
    CONTEXT_MARKER,
    MAX_SNS_MESSAGE_BYTES,
    Callback,
    ErrorInfo,
    TaskStatus,
)
from sdeks.envelope import check_prefix, check_task_id, parse_task
from sdeks.errors import InvalidEnvelopeError, InvalidParameterError
from sdeks.names import check_runtime_name


def test_excerpt_is_short_escaped_and_never_doubles_backslashes():
    assert excerpt("a\nb\x00\ud800") == '"a\\nb\\x00\\ud800"'
    assert excerpt("\\" * 10) == '"' + "\\" * 10 + '"'  # printable: kept, not doubled
    long = excerpt("\u0390" * 100_000)
    assert len(long) < 200 and "100000 characters" in long
    assert excerpt(10**400) == "an integer of 1329 bits"
    assert excerpt({"k": 1}) == "an object of 1 keys" and excerpt([1, 2]) == "a list of 2 items"
    assert escape("x" * 500, 10) == "x" * 10 + "..."


def test_lone_surrogates_found_in_values_and_keys_and_scrubbed():
    doc = {"a": ["ok", {"\udfff": 1}], "b": "fine"}
    assert find_unencodable(doc, "content") == "content.a[1].\udfff"
    with pytest.raises(InvalidParameterError, match="lone surrogate") as info:
        check_text(doc, "content")
    info.value.message.encode("utf-8")  # the message itself is encodable
    clean = scrub(doc)
    assert find_unencodable(clean, "x") is None
    json.dumps(clean, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize(
    "content",
    [
        {"steps": 10**40},
        {"steps": True},
        {"steps": 20.5},
        {"steps": "1" * 50},
        {"steps": [20]},
        {"width": 0},
        {"width": -8},
        {"n_iter": 1000, "batch_size": 1000},
        {"width": 65536, "height": 65536},
        {"seed": 2**64},
        {"seed": 2**64 - 2, "batch_size": 4},
        {"cfg_scale": float("nan")},
        {"deep": {"x": [float("-inf")]}},
        {"other": -(2**70)},
    ],
)
def test_content_bounds_refuse_absurd_numbers(content):
    with pytest.raises(InvalidParameterError):
        check_content(content)


@pytest.mark.parametrize(
    "content",
    [{}, {"steps": 20, "seed": -1}, {"steps": 20.0}, {"steps": "20"}, {"seed": 2**64 - 1}],
)
def test_content_bounds_accept_what_a1111_accepts(content):
    check_content(content)


@pytest.mark.parametrize("check", [check_task_id, check_prefix, check_runtime_name])
def test_names_match_the_whole_string(check):
    check("abc")
    for bad in ("abc\n", "abc\r\n", "\nabc", "ab\x00c"):
        with pytest.raises(ValueError):
            check(bad)


def test_envelope_error_messages_are_bounded():
    huge_key = "k" * 200_000
    doc = {"task": {"metadata": {}, "content": {}}, huge_key: 1, "\ud800": 2}
    with pytest.raises(InvalidEnvelopeError) as info:
        parse_task(doc)
    assert len(info.value.message) < 600
    serverless = {"input": {"api": {"method": "\u0390" * 100_000, "endpoint": "/x"}}}
    with pytest.raises(InvalidEnvelopeError) as info:
        parse_task(serverless)
    assert len(info.value.message) < 600
    bad_id = {"task": {"metadata": {"id": "\\" * 100_000}, "content": {}}}
    with pytest.raises(InvalidEnvelopeError) as info:
        parse_task(bad_id)
    assert len(info.value.message) < 1_000


def _callback(**fields) -> Callback:
    return Callback(
        id="t1",
        runtime="sdruntime",
        status=TaskStatus.SUCCEEDED,
        result=True,
        output_url="s3://b/p/t1/t1.json",
        **fields,
    )


def test_callback_size_counts_utf8_bytes_and_attributes():
    callback = _callback(context="\u732b" * 1000)
    body = callback.model_dump_json()
    assert callback.sns_size() > len(body.encode()) > 3000 > len(body)


@pytest.mark.parametrize("char", ["x", "\u00fc", "\u732b", "\U0001f408"])
def test_oversized_context_is_replaced_by_a_marker(char):
    n = MAX_SNS_MESSAGE_BYTES // len(char.encode())
    callback = _callback(context={"big": char * n})
    fitted = callback.fitted()
    assert fitted.sns_size() <= MAX_SNS_MESSAGE_BYTES
    marker = fitted.context[CONTEXT_MARKER]
    assert marker["manifest"] == "s3://b/p/t1/t1.json" and marker["bytes"] > n
    kwargs = callback.sns_publish_kwargs("arn:topic")  # what is published is the fitted one
    assert json.loads(kwargs["Message"])["context"] == fitted.context


def test_fitting_drops_bulky_info_before_touching_context():
    info = {"seed": 1, "all_prompts": ["p" * 250_000], "infotexts": ["i" * 60_000]}
    fitted = _callback(context={"keep": "me"}, info=info).fitted()
    assert fitted.context == {"keep": "me"}
    assert fitted.info["seed"] == 1 and "all_prompts" not in fitted.info


def test_image_urls_are_bounded_and_counted():
    urls = [f"s3://b/{'p' * 200}/t1/t1-{n}.png" for n in range(1, 1001)]
    fitted = _callback(image_url=urls).fitted()
    assert 0 < len(fitted.image_url) < 1000 and fitted.image_url_truncated == 1000


def test_surrogates_in_echoed_fields_always_serialise():
    callback = _callback(
        context={"\ud800": "x\udfff"}, error=ErrorInfo(code="c", message="m\ud800" * 10_000)
    )
    callback.fitted().model_dump_json().encode("utf-8")
    assert len(callback.error.message) < 2_100


@pytest.mark.parametrize("command", ["status", "cancel", "wait"])
@pytest.mark.parametrize("task_id", ["", "a/b", "x\n"])
def test_cli_bad_task_id_prints_one_line(command, task_id, capsys):
    from sdeks.cli import main

    assert main([command, task_id]) == 1
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines


def test_image_url_truncated_keeps_the_total_when_urls_are_emptied():
    # GIVEN more URLs than `image_url` keeps, and seeds too many for SNS: the last
    # fitting step empties `image_url` and `seeds`
    urls = [f"s3://b/{'p' * 200}/t1/t1-{n}.png" for n in range(1, 1001)]
    fitted = _callback(image_url=urls, seeds=list(range(10**9, 10**9 + 30_000))).fitted()
    # THEN the count still says how many images there were, not how many step 0 kept
    assert fitted.image_url == [] and fitted.seeds == []
    assert fitted.image_url_truncated == 1000
    assert fitted.sns_size() <= MAX_SNS_MESSAGE_BYTES


def test_unset_optional_counts_stay_out_of_the_callback():
    body = json.loads(_callback(image_url=["s3://b/p/t1/t1-1.png"]).fitted().model_dump_json())
    assert not {"image_url_truncated", "ignored_fields_dropped", "named_id"} & set(body)
    assert Callback.model_fields["named_id"].annotation is not None  # declared, not extra


def test_ignored_fields_are_capped_escaped_and_counted():
    from sdeks.callback import MAX_IGNORED_FIELD_CHARS, MAX_IGNORED_FIELDS

    names = ["bad\nname\x00" + "y" * 500] + [f"k{i}" for i in range(100_000)]
    callback = _callback(ignored_fields=names)
    assert len(callback.ignored_fields) == MAX_IGNORED_FIELDS
    assert callback.ignored_fields_dropped == len(names) - MAX_IGNORED_FIELDS
    first = callback.ignored_fields[0]
    assert first.startswith("bad\\nname\\x00y") and first.endswith("...")
    assert len(first) < 2 * MAX_IGNORED_FIELD_CHARS
    assert all(c.isprintable() for c in first)


def test_fitting_empties_ignored_fields_before_the_context():
    names = [f"{'z' * 60}{i}" for i in range(50)]
    callback = _callback(ignored_fields=names, context={"big": "c" * 259_000})
    fitted = callback.fitted()
    assert fitted.sns_size() <= MAX_SNS_MESSAGE_BYTES
    assert fitted.ignored_fields == [] and fitted.ignored_fields_dropped == 50
    assert fitted.context == {"big": "c" * 259_000}  # kept: emptying the names was enough


@pytest.mark.parametrize(
    ("content", "steps", "images"),
    [
        ({}, 50, 1),
        ({"steps": 20, "n_iter": 2, "batch_size": 3}, 40, 6),
        # read as the pod reads them (`integer_field`): integral floats and digit strings
        ({"steps": "20", "n_iter": 2.0, "batch_size": "4"}, 40, 8),
        ({"steps": True}, None, 1),
        ({"steps": 0, "batch_size": 2.5}, None, None),
        ({"n_iter": 10**9}, None, None),
    ],
)
def test_planned_steps_and_image_count_read_fields_as_the_bounds_do(content, steps, images):
    from sdeks.cli import _image_count
    from sdeks.tasks import planned_steps

    assert planned_steps(content) == steps
    assert _image_count(content) == images
