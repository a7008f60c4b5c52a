"""A newcomer's first hour with the real CLI (`cli.main`) on moto: republished ids,
setup mistakes in one line, the runtime hint, ignored fields, `--version`,
`models list`."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from sdeks import __version__, cli
from sdeks.callback import Callback, TaskStatus
from sdeks.demo import serve_once
from sdeks.envelope import parse_task
from sdeks.lifecycle import Reporter
from sdeks.tasks import TaskTable


@pytest.fixture
def env(aws, stack, monkeypatch):
    """The CLI pointed at one freshly named stack on moto, as after `local up`'s exports."""
    monkeypatch.setenv("SDEKS_STACK", stack.task_table.removesuffix("-tasks"))
    monkeypatch.setenv("SDEKS_TASK_TABLE", stack.task_table)
    monkeypatch.setenv("SDEKS_TASK_TOPIC_ARN", stack.task_topic_arn)
    monkeypatch.setenv("SDEKS_CALLBACK_TOPIC_ARN", stack.callback_topic_arn)
    return TaskTable(aws.dynamodb, stack.task_table)


def envelope(task_id: str, **content) -> dict:
    return {
        "task": {
            "metadata": {
                "id": task_id,
                "runtime": "sdruntime",
                "tasktype": "text-to-image",
                "prefix": "p",
            },
            "content": {"prompt": "a fox", "steps": 4, **content},
        }
    }


def write(tmp_path, body: dict, name: str = "task.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return str(path)


def queued_bodies(aws, stack) -> list[dict]:
    """The task messages in the runtime queue (SNS envelopes unwrapped)."""
    got = aws.sqs.receive_message(
        QueueUrl=stack.queues["sdruntime"], MaxNumberOfMessages=10, WaitTimeSeconds=0
    )
    return [json.loads(json.loads(m["Body"])["Message"]) for m in got.get("Messages", [])]


def finish(aws, stack, table, task_id: str, *, with_png: bool = False) -> Callback:
    asyncio.run(table.record_queued(parse_task(envelope(task_id)), published_at=time.time()))
    key = f"p/{task_id}/{task_id}-1.png"
    if with_png:
        aws.s3.put_object(Bucket=stack.output_bucket, Key=key, Body=b"\x89PNG fake")
    callback = Callback(
        id=task_id,
        runtime="sdruntime",
        status=TaskStatus.SUCCEEDED,
        result=True,
        output_location=f"s3://{stack.output_bucket}/p/{task_id}",
        image_url=[f"s3://{stack.output_bucket}/{key}"],
    )
    assert asyncio.run(Reporter(aws.sns, stack.callback_topic_arn, table=table).finish(callback))
    return callback


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"sdeks {__version__}"


# --- republishing an id that already ended -------------------------------------


def test_submit_of_an_ended_id_says_what_became_of_it_and_publishes_nothing(
    env, aws, stack, tmp_path, capsys
):
    finish(aws, stack, env, "ended-1")
    path = write(tmp_path, envelope("ended-1"))

    code = cli.main(["submit", path])

    out = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert "ended-1 was published before: succeeded (finished 20" in out
    assert f"outputs: s3://{stack.output_bucket}/p/ended-1" in out
    assert "--new-id" in out
    assert queued_bodies(aws, stack) == []


def test_submit_wait_of_an_ended_id_returns_the_existing_result(env, aws, stack, tmp_path, capsys):
    finish(aws, stack, env, "ended-2", with_png=True)
    path = write(tmp_path, envelope("ended-2"))

    code = cli.main(["submit", path, "--wait", "--out", str(tmp_path / "out")])

    out = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert (tmp_path / "out" / "ended-2" / "ended-2-1.png").read_bytes() == b"\x89PNG fake"
    assert "ended-2: succeeded, 1 image(s)" in out
    assert queued_bodies(aws, stack) == []


def test_submit_new_id_publishes_the_same_task_under_a_fresh_id(env, aws, stack, tmp_path, capsys):
    finish(aws, stack, env, "ended-3")
    path = write(tmp_path, envelope("ended-3"))

    assert cli.main(["submit", path, "--new-id"]) == cli.EXIT_OK

    [body] = queued_bodies(aws, stack)
    new_id = body["task"]["metadata"]["id"]
    assert new_id.startswith("ended-3-") and len(new_id) == len("ended-3-") + 6
    assert f"published {new_id}" in capsys.readouterr().out


def test_a_republish_after_the_end_is_recorded_and_shown_by_status(env, aws, stack, capsys):
    task = parse_task(envelope("rep-1"))
    asyncio.run(env.record_queued(task, published_at=100.0))
    finish_cb = Callback(id="rep-1", runtime="sdruntime", status=TaskStatus.SUCCEEDED)
    asyncio.run(env.claim_terminal(finish_cb))
    # A redelivery of the same SNS message (same publish time) is not a republish.
    assert asyncio.run(env.record_queued(task, published_at=100.0)).republished == 0
    # A new publish of the ended id is counted, and the TTL is left alone.
    before = asyncio.run(env.get("rep-1"))
    after = asyncio.run(env.record_queued(task, published_at=200.0))
    assert (after.republished, after.status) == (1, TaskStatus.SUCCEEDED)
    assert after.expires_at == before.expires_at

    assert cli.main(["status", "rep-1"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "republished" in out and "1 time(s) after it ended" in out


# --- setup mistakes: one line each, fast -------------------------------------


def test_no_credentials_is_one_line(env, tmp_path, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    path = write(tmp_path, envelope("creds"))

    assert cli.main(["submit", path]) == cli.EXIT_SETUP

    out = capsys.readouterr().out
    assert out.startswith("error: no AWS credentials") and out.count("\n") == 1
    assert "export" in out


def test_a_stack_that_is_down_fails_at_once_in_one_line(env, tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")

    assert cli.main(["tasks"]) == cli.EXIT_SETUP

    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert f"nothing answers at AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in out
    assert "sdeks local up" in out


def test_an_endpoint_that_is_not_aws_is_one_line(env, tmp_path, monkeypatch, capsys):
    server, url = serve_once(b"<html>not aws</html>", path="/", content_type="text/html")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url.removesuffix("/"))
        code = cli.main(["status", "anything"])
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert code == cli.EXIT_SETUP
    assert out.startswith("error: ") and out.count("\n") == 1


# --- shapes without a runtime, ignored fields ------------------------------------


LEGACY = {
    "alwayson_scripts": {"task": "text-to-image", "id_task": "legacy-1", "save_dir": "legacy"},
    "prompt": "a fox",
    "steps": 4,
}


def test_a_legacy_body_takes_the_stacks_only_runtime(env, aws, stack, tmp_path, capsys):
    assert cli.main(["submit", write(tmp_path, LEGACY)]) == cli.EXIT_OK
    assert "published legacy-1 (runtime sdruntime" in capsys.readouterr().out
    [body] = queued_bodies(aws, stack)
    assert body["alwayson_scripts"]["id_task"] == "legacy-1"


def test_a_legacy_body_without_a_known_runtime_gets_a_hint(env, aws, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDEKS_STACK", "no-such-stack")
    assert cli.main(["submit", write(tmp_path, LEGACY)]) == cli.EXIT_USAGE
    out = capsys.readouterr().out
    assert "runtime" in out and "--runtime" in out


def test_unknown_content_fields_are_reported_before_publishing(env, aws, stack, tmp_path, capsys):
    body = envelope("typo-1", promt="a misspelled prompt")
    assert cli.main(["submit", write(tmp_path, body)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    warning, published = out.splitlines()[:2]
    assert warning.startswith("warning:") and "'promt'" in warning
    assert published.startswith("published typo-1")


# --- models list -------------------------------------------------------------


def test_models_list_names_models_after_their_files_and_folders(env, aws, stack, capsys):
    bucket = stack.models_bucket
    for key in (
        "Stable-diffusion/tiny-xl/model_index.json",
        "Stable-diffusion/tiny-xl/unet/diffusion_pytorch_model.safetensors",
        "Stable-diffusion/sub/v1-5.safetensors",
        "Lora/detail.safetensors",
    ):
        aws.s3.put_object(Bucket=bucket, Key=key, Body=b"{}")

    assert cli.main(["models", "list", "--bucket", bucket]) == cli.EXIT_OK

    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [
        ["checkpoint", "sub/v1-5.safetensors"],
        ["checkpoint", "tiny-xl"],
        ["lora", "detail.safetensors"],
    ]


def test_models_list_of_a_missing_bucket_is_one_line(env, capsys):
    assert cli.main(["models", "list", "--bucket", "no-such-bucket-xyz"]) == cli.EXIT_SETUP
    out = capsys.readouterr().out
    assert out.startswith("error: cannot list s3://no-such-bucket-xyz") and out.count("\n") == 1
