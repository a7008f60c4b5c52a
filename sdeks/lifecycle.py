"""How services report a task's life: `Reporter` is the one way to start, advance
and end a task, so that "exactly one terminal callback per id" holds whoever
ends it (pod, dispatcher, `sdeks cancel`). See docs/lifecycle.md.

    reporter.admit(task)        dispatcher, on every receipt: record it; False = drop the message
    reporter.pin_seed(task)     dispatcher, before dispatch: resolve seed -1 once for all attempts
    reporter.finish(callback)   claim the terminal state in the table, then publish
    reporter.running(task)      mark running (False: do not render); optional `running` callback
    reporter.progress(id, d, t) throttled progress write (False: stop, cancel requested)
    reporter.cancel(id)         cancel a queued (callback now) or running (flag) task
    reporter.recover(id)        republish a claimed callback whose publish was lost
    reporter.reject(callback)   publish the failure of a message that is not a task (no claim)
    reporter.refuse(callback, message_id=...)  the failure of a message refused before
                                admission: claims its id only if no task holds it

Also the status view: `describe` reads a task with its queue position and an
ETA estimate.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel

from sdeks.callback import Callback, TaskStatus, Timings
from sdeks.envelope import Task, TaskType
from sdeks.signing import signature_attributes, signed_limit
from sdeks.tasks import CancelOutcome, TaskRecord, TaskTable, call

log = logging.getLogger(__name__)


class CallbackPending(Exception):
    """A terminal callback is claimed but unconfirmed and not yet stale."""

    def __init__(self, task_id: str, retry_after_s: float) -> None:
        super().__init__(f"task {task_id}: callback claimed, not yet confirmed published")
        self.task_id = task_id
        self.retry_after_s = retry_after_s


class Reporter:
    """Publishes callbacks to the callback topic, guarded by the task table.

    With a `table`, a terminal callback is published only by the caller that
    won the conditional claim: exactly one per task id, even when pods and
    dispatchers race. Without one (``SDEKS_TASK_TABLE`` unset) every
    `finish` publishes: at-least-once, so a redelivered task may be rendered
    and reported twice, and cancel and progress are unavailable.
    """

    def __init__(
        self,
        sns: Any,
        callback_topic_arn: str,
        *,
        table: TaskTable | None = None,
        publish_running: bool = False,
        progress_interval_s: float = 1.0,
        republish_after_s: float = 120.0,
        monotonic: Callable[[], float] = time.monotonic,
        signing_secret: str | None = None,
    ) -> None:
        self._sns = sns
        self._topic_arn = callback_topic_arn
        #: Signs every callback published (sdeks.signing); None publishes them unsigned.
        self._signing_secret = signing_secret
        #: What a callback may take of SNS's limit beside the signature attributes.
        self._limit = signed_limit(signing_secret)
        self.table = table
        self.publish_running = publish_running
        self._progress_interval_s = progress_interval_s
        self.republish_after_s = republish_after_s
        self._monotonic = monotonic
        self._last_progress: dict[str, float] = {}

    async def admit(
        self, task: Task, *, published_at: float | None = None, delivery: str | None = None
    ) -> bool:
        """The dispatcher received `task`. True: dispatch it. False: delete the message
        and do nothing else: the task already ended (its callback is out, or is
        republished here if its publisher died), or it was cancelled while a pod
        that has since died was running it (this call publishes the `cancelled`).
        Raises `CallbackPending` when the task ended but its callback is claimed and
        not yet confirmed: keep the message and come back after `retry_after_s`.

        `delivery` names this copy of the message (SNS message id and the queue it
        reached, or the SQS message id of a raw send). The first copy recorded for an
        id serves it; another copy while the task is live (SNS fan-out to two queues,
        a republish under the same id) is dropped: the first ends it with the one
        terminal callback, and no second render can overwrite its outputs."""
        if self.table is None:
            return True
        record = await self.table.record_queued(task, published_at=published_at, delivery=delivery)
        if record.status.terminal:
            if record.callback_published is False and not await self.recover(
                task.id, stale_after_s=self.republish_after_s
            ):
                # Deleting the message now would lose the callback if its winner died
                # between claim and publish: keep it until the claim goes stale.
                raise CallbackPending(task.id, self.republish_after_s)
            return False
        if delivery is not None and record.delivery not in (None, delivery):
            log.info(
                "task %s: another copy (%s) already serves it; %s dropped",
                task.id,
                record.delivery,
                delivery,
            )
            return False
        if record.cancel_requested:
            message = "cancelled while running; its pod stopped before reporting"
            await self.finish(record.cancelled_callback(int(time.time() * 1000), message))
            return False
        return True

    async def pin_seed(self, task: Task) -> Task:
        """Resolve a random seed (absent or -1) once per task id, so every attempt renders
        the same image. The first attempt's draw is kept in the table; returns the task
        with ``content.seed`` set. Unchanged without a table or for upscales."""
        if self.table is None or task.tasktype in (
            TaskType.EXTRA_SINGLE_IMAGE,
            TaskType.EXTRA_BATCH_IMAGES,
        ):
            return task
        seed = task.content.get("seed", -1)
        if seed is not None and seed != -1:
            return task
        # A1111 draws random seeds from the same range (modules/processing.py).
        chosen = await self.table.remember_seed(task.id, random.randrange(4294967294))
        return task.model_copy(update={"content": {**task.content, "seed": chosen}})

    async def finish(self, callback: Callback, *, run: str | None = None) -> bool:
        """End the task with `callback` (succeeded, failed or cancelled).

        `run`: the pod's render attempt (`running`); it claims only while it still
        holds the task, so an attempt another one superseded publishes nothing.

        True: this call won and published. False: the task had already ended
        (another pod, dispatcher or a cancel won); nothing was published.
        Table errors propagate before anything is published; a publish error
        propagates after the claim, and `recover` republishes later.
        """
        if not callback.status.terminal:
            raise ValueError(f"finish needs a terminal status, got {callback.status}")
        # Fitted before the claim: the table stores, and recovery republishes, exactly
        # what fits in one SNS message (docs/reliability.md, "Bounds").
        callback = callback.fitted(self._limit)
        if callback.id is not None:
            self._last_progress.pop(callback.id, None)
        if self.table is not None and callback.id is not None:
            if not await self.table.claim_terminal(callback, run=run):
                return False
        await self._publish(callback)
        await self._confirm(callback)
        return True

    async def running(
        self,
        task: Task,
        *,
        pod: str | None = None,
        total_steps: int | None = None,
        timings: Timings | None = None,
        run: str | None = None,
    ) -> bool:
        """The pod starts rendering `task`. False: it ended or a cancel was requested:
        do not render and publish nothing (whoever ended it published). `run` names
        this render attempt (`TaskTable.mark_running`)."""
        if self.table is not None:
            started = await self.table.mark_running(
                task.id, pod=pod, total_steps=total_steps, run=run
            )
            if not started:
                log.info("task %s: not starting, it ended or a cancel was requested", task.id)
                return False
        if self.publish_running:
            callback = Callback.for_task(task, TaskStatus.RUNNING, timings=timings or Timings())
            try:
                await self._publish(callback)
            except Exception:  # informational only: a render must not fail for it
                log.warning("task %s: could not publish the running callback", task.id)
        return True

    async def may_write_outputs(self, task_id: str, *, run: str) -> bool:
        """True while render attempt `run` still holds the task: it may write its
        outputs. False: another attempt took it over (or it ended): write nothing."""
        if self.table is None:
            return True
        return await self.table.may_write_outputs(task_id, run=run)

    async def progress(
        self, task_id: str, done: int, total: int, *, run: str | None = None
    ) -> bool:
        """Record progress at most every `progress_interval_s`. False: stop rendering
        (cancel requested, or the task is no longer running here)."""
        if self.table is None:
            return True
        now = self._monotonic()
        last = self._last_progress.get(task_id)
        if last is not None and now - last < self._progress_interval_s and done < total:
            return True
        self._last_progress[task_id] = now
        return await self.table.update_progress(task_id, done, total, run=run)

    async def cancel(self, task_id: str) -> CancelOutcome:
        """Cancel a task. Queued: it ends now and this call publishes its `cancelled`
        callback. Running: the pod is asked to stop between steps; it publishes."""
        if self.table is None:
            raise RuntimeError("cancel needs the task table (SDEKS_TASK_TABLE)")
        outcome, record = await self.table.request_cancel(task_id)
        if outcome is CancelOutcome.CANCELLED and record is not None:
            callback = record.terminal_callback()
            if callback is not None:
                try:
                    await self._publish(callback)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "AuthorizationError":
                        raise
                    # Deployed, only the dispatcher and the pods may publish callbacks
                    # (the callback topic's policy). The claim stands: the dispatcher
                    # publishes it, signed, when it next receives the task (`admit`).
                    log.info("task %s: cancelled; the dispatcher publishes its callback", task_id)
                    return outcome
                await self._confirm(callback)
        return outcome

    async def recover(self, task_id: str, *, stale_after_s: float | None = None) -> bool:
        """Republish the stored terminal callback of a task whose winner claimed it but
        did not confirm the publish within `stale_after_s` (crash, SNS error). The
        dispatcher's `admit` calls this for such a task. True: published."""
        if self.table is None:
            return False
        stale = self.republish_after_s if stale_after_s is None else stale_after_s
        callback = await self.table.claim_republish(task_id, stale_after_s=stale)
        if callback is None:
            return False
        log.warning(
            "task %s: republishing a %s callback left unconfirmed", task_id, callback.status
        )
        await self._publish(callback)
        await self._confirm(callback)
        return True

    async def reject(self, callback: Callback) -> None:
        """Publish the failed callback of a message that is not a task. Nothing is
        claimed: its id, if any, was read from an invalid message, and claiming it
        could end someone else's task."""
        if callback.status is not TaskStatus.FAILED:
            raise ValueError(f"reject needs a failed callback, got {callback.status}")
        await self._publish(callback)

    async def refuse(
        self, callback: Callback, *, message_id: str | None, delivery: str | None = None
    ) -> bool:
        """Publish the failure of a message refused before admission (not a task, an
        unknown runtime, a bound broken at the edge).

        Its id (read from the message) is claimed only if no live task holds it
        (`claim_terminal(new_only=True)`): then it is the id's one terminal callback.
        If another task holds the id, that task is left alone and the failure goes
        out with ``id: null``, `named_id` (the id it named) and `message_id`, so it
        is never a second terminal callback for that id. A redelivery of a message
        whose refusal already claimed the id publishes nothing (False), and neither
        does another copy of it (`delivery`, as in `admit`: SNS fan-out to two
        queues) while the copy that claimed has not confirmed its publish yet.
        """
        if callback.status is not TaskStatus.FAILED:
            raise ValueError(f"refuse needs a failed callback, got {callback.status}")
        callback = callback.model_copy(update={"message_id": message_id}).fitted(self._limit)
        if callback.id is not None and self.table is not None:
            if await self.table.claim_terminal(callback, new_only=True, delivery=delivery):
                await self._publish(callback)
                await self._confirm(callback)
                return True
            record = await self.table.get(callback.id, live=False)
            stored = record.terminal_callback() if record is not None else None
            if (
                record is not None
                and stored is not None
                and message_id
                and getattr(stored, "message_id", None) == message_id
            ):
                if record.callback_published is False:
                    if delivery is not None and record.delivery not in (None, delivery):
                        # Another copy of this message claimed and is publishing now. Its
                        # SQS message is deleted only once it has: if it dies first, that
                        # copy's redelivery republishes. Publishing here too would be a
                        # second terminal callback for the id.
                        log.info(
                            "task %s: refusal of message %s claimed by copy %s; %s dropped",
                            callback.id,
                            message_id,
                            record.delivery,
                            delivery,
                        )
                        return False
                    await self._publish(stored)  # our own claim, its publish was lost
                    await self._confirm(stored)
                    return True
                log.info("task %s: refusal of message %s already out", callback.id, message_id)
                return False
            # Refitted: `named_id` adds to a callback fitted without it.
            callback = callback.model_copy(update={"id": None, "named_id": callback.id}).fitted(
                self._limit
            )
        await self._publish(callback)
        return True

    async def _publish(self, callback: Callback) -> None:
        # Fitted with room for the signature attributes: SNS counts them too, and a
        # callback that fits only without them would fail every publish for good.
        kwargs = callback.sns_publish_kwargs(self._topic_arn, limit=self._limit)
        if self._signing_secret:
            kwargs["MessageAttributes"].update(
                signature_attributes(self._signing_secret, kwargs["Message"])
            )
        await call(self._sns, "publish", **kwargs)
        log.info("task %s: published %s callback", callback.id, callback.status)

    async def _confirm(self, callback: Callback) -> None:
        if self.table is None or callback.id is None:
            return
        try:
            await self.table.mark_published(callback.id)
        except Exception:  # the callback is out; an unconfirmed one is merely republished later
            log.warning("task %s: published but not confirmed in the table", callback.id)


# --- status -------------------------------------------------------------------


class StatusView(BaseModel):
    """What `sdeks status` shows: the record, plus estimates worth what they say."""

    record: TaskRecord
    #: Queued tasks of the same runtime received earlier (None unless queued).
    queue_position: int | None = None
    #: Seconds until the task should end; None when there is no basis for a guess.
    eta_s: float | None = None


async def describe(table: TaskTable, task_id: str, *, workers: int = 1) -> StatusView | None:
    """The task with its queue position and ETA; None when unknown.

    `workers` is how many tasks of that runtime run at once (pods x slots); the
    table cannot know it, the caller may (KEDA/Deployment replica count).
    """
    record = await table.get(task_id)
    if record is None:
        return None
    position = None
    mean_ms = step_ms = None
    if not record.status.terminal:
        if record.status is TaskStatus.QUEUED:
            position = await table.count_queued_before(record)
        # A running task with progress is estimated from its own step rate.
        if record.status is TaskStatus.QUEUED or not record.progress_done:
            renders = await table.recent_renders(record.runtime)
            mean_ms, step_ms = learned_times_ms(renders)
    eta = estimate_eta_s(
        record,
        ahead=position or 0,
        mean_ms=mean_ms,
        workers=workers,
        now_ms=int(time.time() * 1000),
        step_ms=step_ms,
    )
    return StatusView(record=record, queue_position=position, eta_s=eta)


def learned_times_ms(renders: list[tuple[int, int | None]]) -> tuple[float | None, float | None]:
    """(mean execution ms, median ms per step) of measured renders; None without any.

    The time per step is what carries over between tasks of different lengths:
    a 150-step task waits ~150 steps, not one recent 4-step task's time.
    """
    if not renders:
        return None, None
    mean_ms = sum(ms for ms, _ in renders) / len(renders)
    per_step = sorted(ms / steps for ms, steps in renders if steps)
    return mean_ms, (per_step[len(per_step) // 2] if per_step else None)


def estimate_eta_s(
    record: TaskRecord,
    *,
    ahead: int,
    mean_ms: float | None,
    workers: int,
    now_ms: int,
    step_ms: float | None = None,
) -> float | None:
    """A plain estimate from measured render times, no model behind it.

    Its own render: its steps (`progress_total`, else `planned_steps`) x the
    learned time per step (`step_ms`), else the mean execution time of recent
    tasks (`mean_ms`). Queued: tasks ahead / workers x `mean_ms`, plus its own
    render. Running: remaining steps x its own time per step so far; before the
    first step, its own render minus elapsed. Finished: 0.
    """
    if record.status.terminal:
        return 0.0
    total = record.progress_total or record.planned_steps
    own_ms = total * step_ms if step_ms is not None and total else mean_ms
    if record.status is TaskStatus.RUNNING and record.started_at is not None:
        elapsed = max(0, now_ms - record.started_at)
        done = record.progress_done or 0
        if done > 0 and (record.progress_total or 0) >= done:
            return ((record.progress_total or 0) - done) * (elapsed / done) / 1000
        if own_ms is not None:
            return max(0.0, own_ms - elapsed) / 1000
        return None
    if own_ms is None:
        return None
    queue_ms = ahead / max(1, workers) * (mean_ms if mean_ms is not None else own_ms)
    return (queue_ms + own_ms) / 1000
