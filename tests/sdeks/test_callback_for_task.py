"""`Callback.for_task`: the fields every callback about a task repeats."""

from __future__ import annotations

from sdeks.callback import Callback, ErrorInfo, TaskStatus
from sdeks.envelope import Task, TaskType

TASK = Task(
    id="t-1",
    runtime="sdruntime",
    tasktype=TaskType.IMAGE_TO_IMAGE,
    prefix="out",
    context={"user": 7},
)


def test_for_task_copies_the_task_fields_and_mirrors_success():
    callback = Callback.for_task(TASK, TaskStatus.SUCCEEDED, image_url=["s3://b/out/t-1/t-1-1.png"])

    assert (callback.id, callback.runtime, callback.tasktype) == (
        "t-1",
        "sdruntime",
        "image-to-image",
    )
    assert callback.context == {"user": 7}
    assert callback.result is True
    assert callback.image_url == ["s3://b/out/t-1/t-1-1.png"]


def test_for_task_failed_carries_the_error_and_no_result():
    error = ErrorInfo(code="invalid_parameter", message="`width` ...")

    callback = Callback.for_task(TASK, TaskStatus.FAILED, error=error)

    assert callback.result is False
    assert callback.error == error
    assert callback.context == {"user": 7}
