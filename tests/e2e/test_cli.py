"""`sdeks submit --wait` against the embedded stack, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from sdeks import cli
from sdeks.callback import TaskStatus
from sdeks.envelope import Task, TaskType
from sdeks.local import LOCAL_CREDENTIALS


@pytest.fixture
def cli_env(local, monkeypatch):
    for key, value in {**local.exports(), **LOCAL_CREDENTIALS}.items():
        monkeypatch.setenv(key, value)


def write_task(tmp_path, *, model: str = "tiny-sd15") -> tuple[str, str]:
    task_id = f"cli-{uuid.uuid4().hex[:8]}"
    task = Task(
        id=task_id,
        runtime="sdruntime",
        tasktype=TaskType.TEXT_TO_IMAGE,
        prefix="cli",
        content={
            "prompt": "a blue sphere",
            "steps": 2,
            "width": 64,
            "height": 64,
            "alwayson_scripts": {"sd_model_checkpoint": model},
        },
    )
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task.to_envelope()))
    return str(path), task_id


def test_submit_wait_downloads_pngs(cli_env, tmp_path, capsys):
    path, task_id = write_task(tmp_path)
    out = tmp_path / "out"
    code = cli.main(["submit", path, "--wait", "--out", str(out), "--timeout", "240"])
    printed = capsys.readouterr().out
    assert code == cli.EXIT_OK, printed
    png = out / task_id / f"{task_id}-1.png"
    assert str(png) in printed
    assert Image.open(png).size == (64, 64)


def test_submit_wait_exits_non_zero_on_failed_callback(cli_env, tmp_path, capsys):
    path, task_id = write_task(tmp_path, model="no-such-model")
    code = cli.main(["submit", path, "--wait", "--out", str(tmp_path), "--timeout", "240"])
    printed = capsys.readouterr().out
    assert code == cli.EXIT_FAILED
    assert "model_not_found" in printed
    assert not (tmp_path / task_id).exists()


def test_submit_rejects_an_invalid_file_before_publishing(cli_env, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"task": {"metadata": {"id": "../etc"}}}')
    assert cli.main(["submit", str(path)]) == cli.EXIT_USAGE
    assert "id" in capsys.readouterr().out


# --- issue 16: a newcomer's first hour on the embedded stack ---------------------

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize(
    "example", ["image-to-image.json", "legacy-a1111.json", "serverless-txt2img.json"]
)
def test_each_example_renders_as_documented(cli_env, tmp_path, capsys, example):
    # As docs/local.md says: no --runtime (the stack serves one), --new-id to re-run.
    out = tmp_path / "out"
    code = cli.main(
        ["submit", str(EXAMPLES / example), "--new-id", "--wait", "--out", str(out)]
        + ["--timeout", "240"]
    )
    printed = capsys.readouterr().out
    assert code == cli.EXIT_OK, printed
    assert list(out.glob("*/*-1.png")), printed


def test_republishing_an_ended_id_is_never_silent(cli_env, local, client, tmp_path, capsys):
    path, task_id = write_task(tmp_path)
    assert cli.main(["submit", path, "--wait", "--out", str(tmp_path), "--timeout", "240"]) == 0
    capsys.readouterr()

    # A publisher that bypasses the CLI publishes the same id again: dropped, recorded.
    body = json.loads(Path(path).read_text())
    client.publish(body, runtime="sdruntime")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert cli.main(["status", task_id]) == cli.EXIT_OK
        status = capsys.readouterr().out
        if "republished" in status:
            break
        time.sleep(0.5)
    assert "1 time(s) after it ended" in status

    # The CLI checks first: it says what happened and how to render again ...
    code = cli.main(["submit", path, "--wait", "--out", str(tmp_path / "again")])
    printed = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert f"{task_id} was published before: succeeded" in printed
    assert "--new-id" in printed
    # ... and --wait returns the existing result.
    assert (tmp_path / "again" / task_id / f"{task_id}-1.png").exists()


def test_submit_wait_draws_steps_from_the_task_table(cli_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws as on a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    path, task_id = write_task(tmp_path)
    assert cli.main(["submit", path, "--wait", "--out", str(tmp_path), "--timeout", "240"]) == 0
    err = capsys.readouterr().err
    assert "2/2 steps" in err  # from the table: callbacks carry no steps
    assert "━" in err  # rich's bar

    assert cli.main(["wait", task_id, "--out", str(tmp_path / "w")]) == cli.EXIT_OK
    assert f"{task_id} succeeded" in capsys.readouterr().err


def test_unknown_fields_are_reported_in_callback_and_manifest(local, client, capsys, tmp_path):
    task = Task(
        id=f"typo-{uuid.uuid4().hex[:8]}",
        runtime="sdruntime",
        tasktype=TaskType.TEXT_TO_IMAGE,
        prefix="cli",
        content={"prompt": "a fox", "promt": "typo", "steps": 2, "width": 64, "height": 64},
    )
    with client.listen([task.id]) as listener:
        client.publish(task.to_envelope(), runtime="sdruntime")
        callback = listener.wait_terminal([task.id], 240)[task.id]
    assert callback.status is TaskStatus.SUCCEEDED
    assert callback.ignored_fields == ["promt"]
    bucket, key = callback.output_url.removeprefix("s3://").split("/", 1)
    manifest = json.loads(client.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert manifest["ignored_fields"] == ["promt"]


def test_a_failed_callback_without_an_id_carries_the_sns_message_id(local, client):
    with client.listen() as listener:
        message_id = client.publish("this is not json", runtime="sdruntime")
        deadline = time.monotonic() + 60
        mine = []
        while not mine and time.monotonic() < deadline:
            mine = [c for c in listener.poll() if c.message_id == message_id]
    assert mine, "no failed callback carried the message id"
    assert (mine[0].id, mine[0].status, mine[0].error.code) == (
        None,
        TaskStatus.FAILED,
        "invalid_envelope",
    )


@pytest.mark.parametrize("example", ["text-to-image.json", "legacy-a1111.json"])
def test_publish_boto3_example_handles_each_shape_and_reruns(cli_env, example):
    script = [sys.executable, str(EXAMPLES / "publish_boto3.py"), str(EXAMPLES / example)]
    for _ in range(2):  # fresh ids: a second run renders again
        run = subprocess.run(
            [*script, "--timeout", "240"], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout + run.stderr
        callback = json.loads(run.stdout.split("\n", 1)[1])
        assert callback["status"] == "succeeded"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_dispatcher_metrics_listen_where_the_log_says(local):
    [dispatcher] = local.dispatcher_services
    port = int(dispatcher.url.rsplit(":", 1)[1])
    assert dispatcher.url == f"http://127.0.0.1:{port}"
    assert f"metrics on http://127.0.0.1:{port}/metrics" in dispatcher.log_path.read_text()
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0
