"""Progress and cancellation of one running job, shared by the render thread and the HTTP side.

The render stages call `JobControl.check()` between denoising steps (raising
`TaskCancelledError` stops the pipeline there) and `JobControl.advance()`
after each step, so `/v1/state`, `/sdapi/v1/progress` and the task table see
the steps of every pass (first pass, hires pass, refiner) as one count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sdeks.errors import TaskCancelledError, TaskTimeoutError


class SupersededError(Exception):
    """Another render attempt of the task took it over while this one rendered
    (`TaskTable.mark_running`): this attempt writes no outputs and reports nothing."""


@dataclass
class JobControl:
    """Progress and cancellation of one running job, shared with the HTTP side."""

    job_id: str
    cancel_event: threading.Event = field(default_factory=threading.Event)
    #: Steps done in the current `n_iter` batch, over all its passes.
    step: int = 0
    #: Steps in one `n_iter` batch, over all its passes.
    steps: int = 0
    job_no: int = 0
    job_count: int = 1
    started: float = field(default_factory=time.time)
    #: A1111 `/interrupt` semantics: keep the images finished so far instead of failing.
    keep_partial: bool = False
    #: Called after every denoising step with (steps done, steps in all), from the render thread.
    on_progress: Callable[[int, int], None] | None = None
    #: `time.monotonic()` after which the job stops between steps with `TaskTimeoutError`
    #: (the runtime's task time limit, `SDEKS_TASK_TIME_LIMIT_S`); None: no limit.
    deadline: float | None = None
    time_limit_s: float | None = None

    def limit_time(self, seconds: float | None) -> None:
        """Stop the job between steps once it has run `seconds` (from now)."""
        self.time_limit_s = seconds
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def progress(self) -> float:
        if self.steps <= 0:
            return 0.0
        done = self.job_no * self.steps + self.step
        return min(1.0, done / (self.steps * max(self.job_count, 1)))

    def check(self) -> None:
        if self.cancelled:
            raise TaskCancelledError(f"task {self.job_id} was cancelled", task_id=self.job_id)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TaskTimeoutError(
                f"task {self.job_id} ran past this runtime's time limit of "
                f"{self.time_limit_s:g} s and was stopped",
                task_id=self.job_id,
            )

    def advance(self, step: int) -> None:
        """Record `step` steps done in this batch, report them, and stop if cancelled."""
        self.step = step
        if self.on_progress is not None:
            total = self.steps * self.job_count
            self.on_progress(self.job_no * self.steps + self.step, total)
        self.check()
