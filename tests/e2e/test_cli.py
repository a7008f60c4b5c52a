"""`sdeks submit --wait` against the embedded stack, as a user runs it."""

from __future__ import annotations

import json
import uuid

import pytest
from PIL import Image

from sdeks import cli
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
