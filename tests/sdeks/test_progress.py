"""The progress bar of `submit --wait` and `wait`, drawn from a task record."""

from __future__ import annotations

import io

from rich.console import Console

from sdeks.callback import TaskStatus
from sdeks.lifecycle import StatusView
from sdeks.progress import TaskProgress
from sdeks.tasks import TaskRecord


def draw(*views: StatusView, images: int | None = 2) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, width=150, record=True)
    with TaskProgress("t-1", None, images=images, console=console) as progress:
        for view in views:
            progress.show(view)
    # Live frames follow one another in the recording: keep the last one drawn.
    return "t-1 " + console.export_text().rsplit("t-1 ", 1)[-1]


def test_a_running_task_shows_steps_images_and_eta():
    record = TaskRecord(
        id="t-1", status=TaskStatus.RUNNING, started_at=1, progress_done=89, progress_total=150
    )
    text = draw(StatusView(record=record, eta_s=21.4))
    assert "t-1 running" in text
    assert "89/150 steps" in text and "0/2 images" in text and "eta ~21s" in text


def test_a_queued_task_shows_its_place_and_planned_steps():
    record = TaskRecord(id="t-1", status=TaskStatus.QUEUED, received_at=1, planned_steps=150)
    text = draw(StatusView(record=record, queue_position=2, eta_s=300))
    assert "queued (#3 in queue)" in text and "0/150 steps" in text and "eta ~5m" in text


def test_a_finished_task_fills_the_bar():
    record = TaskRecord(
        id="t-1",
        status=TaskStatus.SUCCEEDED,
        progress_done=4,
        progress_total=4,
        image_url=["s3://b/p/t-1/t-1-1.png", "s3://b/p/t-1/t-1-2.png"],
    )
    text = draw(StatusView(record=record, eta_s=0.0))
    assert "t-1 succeeded" in text and "4/4 steps" in text and "2 images" in text
    assert "eta" not in text
