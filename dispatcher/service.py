"""The consumer: receive, hold, resolve, dispatch, delete.

One receive loop per queue (each runtime queue and the catch-all) keeps at
most `window` messages of its queue in hand; each message gets one coroutine
(`_handle`) that owns its lease from receipt to deletion or release:

    unwrap SNS -> parse_task -> (catch-all or misrouted: forward, done)
    -> resolve links -> Router.run_job (waits for a pod, retries elsewhere)
    -> pod answered 200: its callback is published -> delete

A message that cannot become a task gets a failed callback and its raw body
is kept under `rejected/` in the output bucket; a task that fails here (link
refused, model nowhere, pod refused it) gets a failed callback. Either way
the message is deleted only once that callback is published. When pods keep
failing, the message is released so SQS counts the receive; on the last
receive before the DLQ the dispatcher publishes a `dispatch_failed` callback
first, and SQS moves the message to the DLQ on its next receive.

SIGTERM (`stop`): receiving stops, tasks still waiting for a pod are released
at once for another replica, running jobs get `grace_period_s`, then are
released too. Several replicas are safe side by side: SQS visibility gives
each message to one of them at a time, and heartbeats keep it that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dispatcher.errors import (
    DispatchFailedError,
    PodDuplicateError,
    PodFailedError,
    PodRejectedError,
)
from dispatcher.leases import Lease, LeaseKeeper
from dispatcher.links import LinkResolver, find_links
from dispatcher.metrics import Metrics
from dispatcher.queues import Source, Window
from dispatcher.routing import OTHER_LABEL, Draining, Router
from dispatcher.settings import DispatcherSettings
from sdeks.bounds import check_task
from sdeks.callback import Callback, ErrorInfo, TaskStatus
from sdeks.envelope import (
    MessageAttribute,
    Notification,
    Task,
    parse_task,
    read_attributes,
    string_attributes,
    unwrap_sns,
)
from sdeks.errors import (
    InvalidEnvelopeError,
    InvalidParameterError,
    LinkError,
    ModelNotFoundError,
    SdeksError,
    UnknownRuntimeError,
)
from sdeks.job import Job
from sdeks.lifecycle import CallbackPending, Reporter
from sdeks.names import REJECTED_PREFIX, RUNTIME_ATTRIBUTE, is_runtime_name

log = logging.getLogger(__name__)

#: SQS message attribute carrying the original publish time of a forwarded task.
PUBLISHED_AT_ATTRIBUTE = "published_at"
#: SQS message attribute naming the delivery a forwarded task came from (`Reporter.admit`).
DELIVERY_ATTRIBUTE = "delivery"
_SQS_BATCH = 10
_SHORT_POLL_PAUSE_S = 0.1


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings,
        *,
        sqs: Any,
        sns: Any,
        s3: Any,
        links: LinkResolver,
        router: Router,
        leases: LeaseKeeper,
        metrics: Metrics,
        sources: list[Source],
        reporter: Reporter | None = None,
    ) -> None:
        self.settings = settings
        self.sqs, self.s3 = sqs, s3
        self.reporter = reporter or Reporter(sns, settings.callback_topic_arn)
        self.links = links
        self.router = router
        self.leases = leases
        self.metrics = metrics
        self.sources = sources
        self._windows = {s.queue_url: Window(self._window_size(s)) for s in sources}
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._ahead = asyncio.Semaphore(settings.link_ahead)
        self._polling: set[str] = set()  # queues with a ReceiveMessage in flight

    def _window_size(self, source: Source) -> Callable[[], int]:
        # The catch-all only forwards: it keeps the smallest window.
        pods = self.router.pods
        return lambda: self.settings.window_for(len(pods.get(source.runtime or "", ())))

    # --- lifecycle ----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        background = [
            asyncio.create_task(self.leases.run(), name="heartbeat"),
            asyncio.create_task(self.router.run(), name="router"),
        ]
        receivers = [
            asyncio.create_task(self._receive_loop(s), name=f"receive-{s.name}")
            for s in self.sources
        ]
        log.info("dispatcher consuming %s", ", ".join(s.name for s in self.sources))
        await stop.wait()

        # 1. Stop receiving. A long poll in flight is let finish rather than
        #    cancelled: cancelling it would hide what it received until the
        #    visibility timeout lapses. What it returns is released at once.
        self._stopping.set()
        for source, task in zip(self.sources, receivers, strict=True):
            if source.queue_url not in self._polling:  # waiting for room in its window
                task.cancel()
        _, stuck = await asyncio.wait(receivers, timeout=self.settings.receive_wait_s + 5)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        # 2. Release what waits for a pod; give running jobs the grace period.
        self.router.drain()
        log.info(
            "draining: %d messages held, grace %g s",
            len(self._handlers),
            self.settings.grace_period_s,
        )
        if self._handlers:
            _, pending = await asyncio.wait(
                set(self._handlers), timeout=self.settings.grace_period_s
            )
            # 3. Release the rest; a job the pod still renders may then run again elsewhere
            #    (outputs are idempotent by key, callbacks deduplicated by task id).
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.warning(
                    "released %d running tasks at the end of the grace period", len(pending)
                )
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        log.info("dispatcher stopped")

    async def _receive_loop(self, source: Source) -> None:
        window = self._windows[source.queue_url]
        backoff = 1.0
        while not self._stopping.is_set():
            n = await window.reserve(_SQS_BATCH)
            self._polling.add(source.queue_url)
            try:
                answer = await self.sqs.receive_message(
                    QueueUrl=source.queue_url,
                    MaxNumberOfMessages=n,
                    WaitTimeSeconds=self.settings.receive_wait_s,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
            except (ClientError, BotoCoreError):
                window.free(n)
                log.warning("receive from %s failed", source.name, exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            except BaseException:
                window.free(n)
                raise
            finally:
                self._polling.discard(source.queue_url)
            backoff = 1.0
            messages = answer.get("Messages", [])
            window.free(n - len(messages))
            if self._stopping.is_set() and messages:
                await self._release_unprocessed(source, messages)
                window.free(len(messages))
                return
            if not messages and not self.settings.receive_wait_s:
                await asyncio.sleep(_SHORT_POLL_PAUSE_S)  # short polling: do not spin
            for message in messages:
                handler = asyncio.create_task(self._handle(source, message))
                self._handlers.add(handler)
                handler.add_done_callback(self._handlers.discard)
                handler.add_done_callback(lambda _: window.free(1))

    async def _release_unprocessed(self, source: Source, messages: list[dict[str, Any]]) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(messages)
        ]
        try:
            await self.sqs.change_message_visibility_batch(
                QueueUrl=source.queue_url, Entries=entries
            )
        except (ClientError, BotoCoreError):
            log.warning("could not release %d messages received while stopping", len(entries))

    # --- one message --------------------------------------------------------

    async def _handle(self, source: Source, message: dict[str, Any]) -> None:
        lease = self.leases.hold(
            source.queue_url, message["ReceiptHandle"], message["MessageId"], runtime=source.runtime
        )
        self.metrics.leases.labels(source.name).inc()
        try:
            await self._process(source, message, lease)
        except Draining:
            await self.leases.release(lease)
            self.metrics.completed.labels(source.name, "released").inc()
        except asyncio.CancelledError:
            await self.leases.release(lease)
            self.metrics.completed.labels(source.name, "released").inc()
            raise
        except Exception:
            # Unexpected (SNS or SQS down, a bug): keep the message; it reappears
            # when its visibility lapses and is retried, up to the DLQ.
            self.metrics.errors.labels("message").inc()
            log.exception(
                "message %s not processed; it will be retried",
                lease.message_id,
                extra={"task_id": lease.task_id},
            )
        finally:
            self.leases.forget(lease)
            self.metrics.leases.labels(source.name).dec()

    async def _process(self, source: Source, message: dict[str, Any], lease: Lease) -> None:
        received_at = time.time()
        note = unwrap_sns(message.get("Body", ""))
        typed = _message_attributes(message)
        attributes = string_attributes(typed)
        hint = note.runtime or attributes.get(RUNTIME_ATTRIBUTE) or source.runtime
        owner = self._fanout_owner(note)
        if owner is not None and owner != source.runtime:
            # SNS put a copy of this message in `owner`'s queue too (a multi-valued
            # `runtime` attribute): that copy serves it. This one is no task of its
            # own; refusing it could claim the id and drop the valid copy.
            log.info(
                "message %s: a copy for runtime %s is in its own queue; %s copy dropped",
                note.message_id,
                owner,
                source.name,
            )
            await self.leases.delete(lease)
            self.metrics.completed.labels(source.name, "fan-out copy").inc()
            return
        system = message.get("Attributes") or {}
        receive_count = int(system.get("ApproximateReceiveCount", "1"))
        published_at = (
            note.published_at
            or _float(_value(typed, PUBLISHED_AT_ATTRIBUTE, ("Number", "String")))
            or (_float(system.get("SentTimestamp")) or 0) / 1000
            or received_at
        )
        # Which copy of the message this is: SNS fans one message out to every queue
        # whose filter matches (a multi-valued `runtime` attribute can match several);
        # the first copy admitted serves the task (`Reporter.admit`).
        delivery = attributes.get(DELIVERY_ATTRIBUTE) or (
            f"sns:{note.message_id}@{source.name}" if note.message_id else f"sqs:{lease.message_id}"
        )
        try:
            task = parse_task(
                note.body, runtime=hint, fallback_id=note.message_id or lease.message_id
            )
        except InvalidEnvelopeError as exc:
            await self._reject(lease, message, note, exc, runtime=hint, delivery=delivery)
            return
        lease.task_id = task.id
        # 0. Bounds at the edge, before anything is stored or forwarded (sdeks.bounds).
        try:
            check_task(task)
        except InvalidParameterError as exc:
            exc.task_id = task.id
            await self._reject(
                lease, message, note, exc, runtime=task.runtime, task=task, delivery=delivery
            )
            return
        if task.runtime not in self.settings.queues:
            known = sorted(self.settings.queues)
            error = UnknownRuntimeError(
                f"runtime {task.runtime!r} is not served here; known runtimes: {known}",
                task_id=task.id,
            )
            await self._reject(
                lease, message, note, error, runtime=task.runtime, task=task, delivery=delivery
            )
            return
        if task.runtime != source.runtime:
            await self._forward(lease, task, published_at, delivery)
            return
        # The task may wait minutes in the window: keep only its parsed form, not
        # the SQS body and the SNS message inside it (up to 256 KiB each).
        message.pop("Body", None)
        del note
        await self._dispatch(
            source, lease, task, receive_count, published_at, received_at, delivery
        )

    def _runtime_label(self, runtime: str | None) -> str:
        """A metric label for a runtime named by a message: a served one, `catch-all`
        for none, else `other`. A publisher must not mint label values (each one is a
        series kept in this process and in Prometheus)."""
        if runtime is None:
            return "catch-all"
        return runtime if runtime in self.settings.queues else OTHER_LABEL

    def _fanout_owner(self, note: Notification) -> str | None:
        """The runtime whose queue SNS gave this message to as well, when its `runtime`
        attribute is a ``String.Array``: SNS matches an array by any of its values,
        so each runtime named has a copy in its queue (and the catch-all one if a
        value is unknown). The first value naming a runtime with a queue serves;
        None when no value does (this copy is then the only one). Other types
        (Number, Binary) match no runtime queue's filter: one copy, no owner."""
        raw = note.typed_attributes.get(RUNTIME_ATTRIBUTE)
        if note.message_id is None or raw is None or raw.type != "String.Array":
            return None
        try:
            values = json.loads(raw.value)
        except (ValueError, RecursionError):
            return None
        if not isinstance(values, list):
            return None
        return next((v for v in values if isinstance(v, str) and v in self.settings.queues), None)

    async def _dispatch(
        self,
        source: Source,
        lease: Lease,
        task: Task,
        receive_count: int,
        published_at: float,
        received_at: float,
        delivery: str | None = None,
    ) -> None:
        runtime = task.runtime
        # 1. The task table: a finished id is dropped (redelivery, republish);
        #    a random seed is drawn once so every attempt renders the same image.
        try:
            admitted = await self.reporter.admit(task, published_at=published_at, delivery=delivery)
        except CallbackPending as exc:
            # Its winner claimed the end but has not confirmed the publish yet: keep
            # the message until the claim is stale, then `admit` republishes it.
            log.info("%s; released", exc, extra={"task_id": task.id})
            await self.leases.release(lease, delay_s=int(min(exc.retry_after_s + 5, 900)))
            self.metrics.completed.labels(runtime, "released").inc()
            return
        if not admitted:
            log.info("task %s already ended; message dropped", task.id, extra={"task_id": task.id})
            await self.leases.delete(lease)
            self.metrics.completed.labels(runtime, "duplicate").inc()
            return
        task = await self.reporter.pin_seed(task)
        # 2. Links become base64 before any pod sees the task. A task with links
        #    holds one of `link_ahead` permits from download to the pod's answer:
        #    that bounds the images held in memory, while tasks without links
        #    take none and the whole window stays visible to the scheduler.
        async with contextlib.AsyncExitStack() as hold:
            if find_links(task.content):
                await hold.enter_async_context(self._ahead)
                # ... and its worst case in the dispatcher's memory budget for links.
                await hold.enter_async_context(
                    self.links.budget.hold(self.links.reservation(task.content))
                )
                self.router.check_open()
            try:
                resolved = await self.links.resolve_content(task.content)
            except LinkError as exc:
                await self._fail(lease, task, exc)
                return
            job = Job(
                task=task.model_copy(update={"content": resolved.content}),
                model=task.model,
                attempt=receive_count,
                published_at=published_at,
                download_ms=resolved.download_ms,
            )
            # 3. A pod renders it and publishes the callback.
            try:
                callback = await self.router.run_job(
                    job,
                    enqueued_at=published_at,
                    attempts=self.settings.pod_attempts,
                    received_at=received_at,
                )
            except ModelNotFoundError as exc:
                await self._fail(lease, task, exc)
                return
            except PodRejectedError as exc:
                await self._fail(lease, task, exc)
                return
            except PodDuplicateError as exc:
                # Rendering it again elsewhere would race the running copy; come back
                # after it ended (the task table then drops the message).
                log.info("%s; released", exc.message, extra={"task_id": task.id})
                await self.leases.release(
                    lease, delay_s=int(max(30, self.settings.retry_backoff_s))
                )
                self.metrics.completed.labels(runtime, "released").inc()
                return
            except PodFailedError as exc:
                if receive_count >= source.max_receive_count:
                    # Last receive: report, then let SQS move the message to the DLQ.
                    error = DispatchFailedError(
                        f"no pod completed the task in {receive_count} receives; last: {exc.message}",
                        task_id=task.id,
                    )
                    await self._finish(_failed(task, error))
                    await self.leases.release(lease)
                    self.metrics.completed.labels(runtime, "dead-lettered").inc()
                else:
                    delay = self.settings.retry_backoff_s * 2 ** (receive_count - 1)
                    await self.leases.release(lease, delay_s=int(min(delay, 300)))
                    self.metrics.completed.labels(runtime, "released").inc()
                return
            # 4. The callback exists: the message is done.
            log.info(
                "task %s %s (attempt %d)",
                task.id,
                callback.status.value,
                receive_count,
                extra={"task_id": task.id},
            )
            await self.leases.delete(lease)
            self.metrics.completed.labels(runtime, "done").inc()

    # --- outcomes -----------------------------------------------------------

    async def _forward(self, lease: Lease, task: Task, published_at: float, delivery: str) -> None:
        """A valid task from the catch-all (or the wrong queue) goes to its runtime's queue."""
        # The normalized envelope, not the raw body: a serverless task's id came
        # from the SNS message id, which the forwarded copy would not have.
        await self.sqs.send_message(
            QueueUrl=self.settings.queues[task.runtime],
            MessageBody=json.dumps(task.to_envelope()),
            MessageAttributes={
                RUNTIME_ATTRIBUTE: {"DataType": "String", "StringValue": task.runtime},
                PUBLISHED_AT_ATTRIBUTE: {"DataType": "Number", "StringValue": repr(published_at)},
                DELIVERY_ATTRIBUTE: {"DataType": "String", "StringValue": delivery},
            },
        )
        log.info(
            "task %s forwarded to runtime %s", task.id, task.runtime, extra={"task_id": task.id}
        )
        await self.leases.delete(lease)
        self.metrics.completed.labels(task.runtime, "forwarded").inc()

    async def _reject(
        self,
        lease: Lease,
        message: dict[str, Any],
        note: Notification,
        error: SdeksError,
        *,
        runtime: str | None,
        task: Task | None = None,
        delivery: str | None = None,
    ) -> None:
        """Not a task we can serve: keep the raw body for audit, publish the failure, delete."""
        await self._keep_rejected(message, note, error)
        log.warning(
            "message %s rejected: %s",
            lease.message_id,
            error.message,
            extra={"task_id": error.task_id},
        )
        # The id is claimed only if no live task holds it (docs/lifecycle.md, "Refused
        # messages"). Raises on failure: the message is then kept and retried.
        callback = (
            _failed(task, error)
            if task is not None
            else Callback(
                id=error.task_id,
                runtime=runtime if is_runtime_name(runtime) else None,
                status=TaskStatus.FAILED,
                error=ErrorInfo.from_exception(error),
            )
        )
        refused = await self.reporter.refuse(
            callback, message_id=note.message_id or lease.message_id, delivery=delivery
        )
        if refused:
            self.metrics.failures.labels(error.code).inc()
        await self.leases.delete(lease)
        self.metrics.completed.labels(self._runtime_label(runtime), "failed").inc()

    async def _fail(self, lease: Lease, task: Task, error: SdeksError) -> None:
        log.warning("task %s failed: %s", task.id, error.message, extra={"task_id": task.id})
        await self._finish(_failed(task, error))
        await self.leases.delete(lease)
        self.metrics.completed.labels(task.runtime, "failed").inc()

    async def _finish(self, callback: Callback) -> None:
        """End the task with the dispatcher's own failed callback, claimed in the task
        table first (when there is one) so a pod or canceller that ended it already wins."""
        if await self.reporter.finish(callback) and callback.error is not None:
            self.metrics.failures.labels(callback.error.code).inc()

    async def _keep_rejected(
        self, message: dict[str, Any], note: Notification, error: SdeksError
    ) -> None:
        key = f"{REJECTED_PREFIX}{time.strftime('%Y/%m/%d', time.gmtime())}/{message.get('MessageId') or uuid.uuid4()}.json"
        record = {
            "error": error.to_error(),
            "task_id": error.task_id,
            "message_id": note.message_id or message.get("MessageId"),
            "attributes": {
                name: {"type": a.type, "value": a.value}
                for name, a in (note.typed_attributes or _message_attributes(message)).items()
            },
            "published_at": note.published_at,
            "body": note.body,
        }
        try:
            await self.s3.put_object(
                Bucket=self.settings.output_bucket,
                Key=key,
                Body=json.dumps(record).encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError):
            log.warning("could not keep rejected message at %s", key, exc_info=True)


def _failed(task: Task, error: SdeksError) -> Callback:
    return Callback.for_task(task, TaskStatus.FAILED, error=ErrorInfo.from_exception(error))


def _message_attributes(message: dict[str, Any]) -> dict[str, MessageAttribute]:
    """The SQS message's attributes, String, Number and Binary (bounded, see
    `read_attributes`): a forwarded task's `published_at` is a Number."""
    return read_attributes(
        message.get("MessageAttributes"),
        type_key="DataType",
        value_keys=("StringValue", "BinaryValue"),
    )


def _value(
    attributes: dict[str, MessageAttribute], name: str, types: tuple[str, ...]
) -> str | None:
    attribute = attributes.get(name)
    return attribute.value if attribute is not None and attribute.type in types else None


def _float(value: Any) -> float | None:
    """A finite, non-negative number, else None: attributes are untrusted input
    (an `inf` or `nan` stamp would break every duration computed from it)."""
    try:
        number = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    if number is None or not math.isfinite(number) or number < 0:
        return None
    return number
