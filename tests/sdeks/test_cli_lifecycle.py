"""`sdeks status | tasks | wait | cancel` against the task table on moto."""

from __future__ import annotations

import asyncio
import json

import pytest

from sdeks import cli
from sdeks.callback import Callback, TaskStatus
from sdeks.client import CallbackListener
from sdeks.envelope import parse_task
from sdeks.lifecycle import Reporter
from sdeks.tasks import TaskTable
from tests.helpers import drain_callbacks


@pytest.fixture
def env(aws, stack, monkeypatch):
    monkeypatch.setenv("SDEKS_TASK_TABLE", stack.task_table)
    monkeypatch.setenv("SDEKS_CALLBACK_TOPIC_ARN", stack.callback_topic_arn)
    return TaskTable(aws.dynamodb, stack.task_table)


def a_task(task_id: str):
    return parse_task(
        {
            "metadata": {
                "id": task_id,
                "runtime": "sdruntime",
                "tasktype": "text-to-image",
                "prefix": "p",
            },
            "content": {"steps": 4},
        }
    )


def test_status_shows_a_queued_task_with_its_position(env, capsys):
    asyncio.run(env.record_queued(a_task("first")))
    asyncio.run(env.record_queued(a_task("second")))
    assert cli.main(["status", "second"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "queued" in out
    assert "queue position" in out and "2" in out.split("queue position")[1].splitlines()[0]


def test_status_of_an_unknown_task_fails(env, capsys):
    assert cli.main(["status", "nope"]) == cli.EXIT_FAILED
    assert "no task" in capsys.readouterr().out


def test_status_json_and_tasks_listing(env, aws, stack, capsys):
    asyncio.run(env.record_queued(a_task("done-1")))
    reporter = Reporter(aws.sns, stack.callback_topic_arn, table=env)
    callback = Callback(
        id="done-1",
        runtime="sdruntime",
        status=TaskStatus.SUCCEEDED,
        result=True,
        image_url=["s3://b/p/done-1/done-1-1.png"],
    )
    assert asyncio.run(reporter.finish(callback)) is True
    assert cli.main(["status", "done-1", "--json"]) == cli.EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["record"]["status"] == "succeeded"
    assert doc["record"]["image_url"] == ["s3://b/p/done-1/done-1-1.png"]
    assert cli.main(["tasks", "--status", "succeeded"]) == cli.EXIT_OK
    listing = capsys.readouterr().out
    assert "done-1" in listing


def test_cancel_a_queued_task_publishes_one_cancelled_callback(env, aws, stack, capsys):
    with CallbackListener(aws.sns, aws.sqs, stack.callback_topic_arn) as listener:
        asyncio.run(env.record_queued(a_task("to-cancel")))
        assert cli.main(["cancel", "to-cancel"]) == cli.EXIT_OK
        assert "cancelled" in capsys.readouterr().out
        published = drain_callbacks(listener)
    assert [(c.id, c.status) for c in published] == [("to-cancel", "cancelled")]
    # a second cancel finds it finished and publishes nothing
    assert cli.main(["cancel", "to-cancel"]) == cli.EXIT_FAILED
    assert "already finished" in capsys.readouterr().out


def test_wait_returns_the_terminal_outcome(env, aws, stack, capsys):
    asyncio.run(env.record_queued(a_task("fails")))
    reporter = Reporter(aws.sns, stack.callback_topic_arn, table=env)
    failed = Callback(
        id="fails",
        runtime="sdruntime",
        status=TaskStatus.FAILED,
        error={"code": "model_not_found", "message": "no model x"},
    )
    asyncio.run(reporter.finish(failed))
    assert cli.main(["wait", "fails", "--timeout", "10", "--interval", "0.1"]) == cli.EXIT_FAILED
    assert "model_not_found" in capsys.readouterr().out


def test_wait_times_out_on_a_task_that_never_ends(env, capsys):
    asyncio.run(env.record_queued(a_task("stuck")))
    code = cli.main(["wait", "stuck", "--timeout", "0.3", "--interval", "0.1"])
    assert code == cli.EXIT_TIMEOUT


def test_ctrl_c_while_waiting_prints_one_line_and_exits_130(env, capsys, monkeypatch):
    import time

    # GIVEN `sdeks wait` following a task that stays queued
    asyncio.run(env.record_queued(a_task("waited-on")))

    # WHEN the user presses Ctrl-C: Python raises KeyboardInterrupt in the main thread,
    # here in the wait's sleep between two polls (raised directly: a SIGINT would not
    # reach this thread under pytest-xdist, whose worker runs tests off the main thread)
    def pressed(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", pressed)
    code = cli.main(["wait", "waited-on", "--timeout", "15"])
    # THEN one line and 130, no traceback
    assert code == cli.EXIT_INTERRUPTED == 130
    captured = capsys.readouterr()
    assert "interrupted" in captured.out
    assert "Traceback" not in captured.out + captured.err
