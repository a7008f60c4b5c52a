"""Regression test for a loss the chaos run found: a pod claims a task's end, dies
(or its SNS publish fails) before publishing, and the dispatcher retries the job
on another pod in the same receive. That pod sees the task already ended, does not render it and
answers 200 with a callback it did not publish (runtime/app.py `post_job`:
`reporter.running` False -> `_cancelled_before_start`); the dispatcher takes the
200 as "the callback exists" and deletes the message. Nobody ever publishes the
claimed callback: the task is lost.

Observed in `benchmarks/chaos.py` (200 tasks, 12 kills): task
`chaos-ced4cc-0145` ended in the table as `failed` with `callback_published:
false`, attempts 1; pod-sdruntime-1 was SIGKILLed between its claim and its
publish, pod-sdruntime-0 answered `cancelled` without claiming or publishing,
and dispatcher-1 deleted the message ("task ... cancelled (attempt 1)"). The
fix of the redelivery path (`CallbackPending` in `Reporter.admit`) does not
cover this path, which never goes back to `admit`.

The fix: the pod answers 409 `already_ended` when it finds the task ended and
published nothing (runtime/app.py `post_job`); the dispatcher releases the
message, and on its next receive `Reporter.admit` keeps it (`CallbackPending`)
until the claim is stale, then republishes the claimed callback.

The pods here are doubles of exactly those two behaviours of the real pod,
built on the real `Reporter` and task table: the first claims and then answers
502 `report_failed` (what runtime/app.py answers when the publish after the
claim raises; a SIGKILL there gives a dropped connection instead, which the
dispatcher treats the same), the second does what runtime/app.py does for a
task that already ended.
"""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from sdeks.callback import Callback, ErrorInfo, TaskStatus
from sdeks.job import Job
from tests.reliability.harness import RUNTIME, Delivery, Harness, plain_task


async def test_claimed_callback_survives_a_retry_on_another_pod_in_the_same_receive(aws, stack):
    harness = Harness(aws, stack)
    calls: list[str] = []

    async def like_the_real_pod(job: Job) -> web.Response:
        """runtime/app.py post_job, reduced to the two paths that matter here."""
        table = harness.reporter.table
        assert table is not None
        if await harness.reporter.running(job.task, pod="a pod"):
            calls.append("claimed")
            claimed = Callback(
                id=job.task.id,
                runtime=job.task.runtime,
                tasktype=job.task.tasktype.value,
                status=TaskStatus.FAILED,
                result=False,
                error=ErrorInfo(code="internal_error", message="render failed"),
            )
            assert await table.claim_terminal(claimed)
            # ... and the publish that follows the claim never happens
            return web.json_response({"code": "report_failed", "message": "SNS"}, status=502)
        # Not started because it ended elsewhere: the pod's own `cancelled` is not
        # claimed (the task ended), so not published, and the pod says so with 409.
        calls.append("found it ended")
        cancelled = Callback(
            id=job.task.id,
            runtime=job.task.runtime,
            tasktype=job.task.tasktype.value,
            status=TaskStatus.CANCELLED,
            result=False,
        )
        assert not await harness.reporter.finish(cancelled)
        return web.json_response(
            {"code": "already_ended", "message": f"task {job.task.id} already ended"}, status=409
        )

    await harness.start([like_the_real_pod, like_the_real_pod])
    try:
        task_id = f"gap-{uuid.uuid4().hex[:8]}"
        body = plain_task(task_id, prefix="gap")
        # WHEN the task's one receive tries one pod, then the other
        assert harness.deliver([Delivery(json.dumps(body), "sns", attribute=RUNTIME)]) == 1
        await harness.handle_all()
        assert calls == ["claimed", "found it ended"]
        # THEN its claimed callback is published, or its message is kept until it can be
        published = [c.id for c in harness.callbacks()]
        assert published == [task_id] or harness.in_flight() == 1
    finally:
        await harness.close()
