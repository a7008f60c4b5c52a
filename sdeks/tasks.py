"""The task table: one DynamoDB item per task id (status, progress, timings,
outputs, webhook outcome) and the conditional writes that keep the lifecycle
right under at-least-once delivery (issue 5, docs/lifecycle.md).

Transitions, each one conditional ``UpdateItem``::

    (none) ──record_queued──▶ queued ──mark_running──▶ running
    queued | running ──claim_terminal──▶ succeeded | failed | cancelled   first writer wins
    queued ──request_cancel──▶ cancelled (claimed by the canceller)
    running ──request_cancel──▶ running + cancel_requested (the pod stops, then claims)

A lost condition is a *result* (False, a `CancelOutcome`, the current record),
never an exception: like Powertools' idempotency layer we translate
``ConditionalCheckFailedException`` at this boundary. Every other
``ClientError`` becomes `TaskTableError`.

Access patterns:

- by id: ``GetItem`` on the partition key ``id`` (strongly consistent);
- recent tasks, optionally of one status: ``Query`` on the GSI `STATUS_INDEX`
  (partition ``status``, sort ``received_at``) newest first; all statuses is
  one query per status, merged;
- queue position: ``Query`` `STATUS_INDEX` for ``status = queued`` and
  ``received_at`` before this task's, filtered on ``runtime``, ``Select=COUNT``.

An item without a ``status`` is *partial*: no write here makes one (every
write that may create an item sets the status, every other one is conditioned
on the status existing), but a hand edit, another writer or an emulator caught
mid-write can show one. Readers treat a partial item as absent and the writes
that may create an item complete it, so it never crashes a reader.

Items expire `ttl_s` after their last lifecycle write (``expires_at``, epoch
seconds, DynamoDB TTL). DynamoDB deletes expired items lazily, so reads treat
an item past ``expires_at`` as absent and `record_queued` starts it afresh.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, ValidationError

from sdeks.bounds import count_of
from sdeks.callback import Callback, ErrorInfo, TaskStatus, Timings
from sdeks.envelope import Task
from sdeks.errors import TaskTableError

log = logging.getLogger(__name__)

#: GSI for "recent tasks" and queue position: partition `status`, sort `received_at`.
STATUS_INDEX = "by-status"
#: The attribute DynamoDB TTL is enabled on (epoch seconds).
TTL_ATTRIBUTE = "expires_at"
#: Seven days: long enough to absorb SQS redeliveries and republishes of a finished id.
DEFAULT_TTL_S = 7 * 24 * 3600
#: Larger contexts are not stored; a callback built from the table then carries none.
MAX_STORED_CONTEXT_BYTES = 64 * 1024

_TERMINAL = [s.value for s in TaskStatus if s.terminal]
_SERIALIZER = TypeSerializer()
_DESERIALIZER = TypeDeserializer()


def table_schema(table_name: str) -> dict[str, Any]:
    """``create_table`` arguments for the task table, GSI included.

    The CDK app declares the same: partition key ``id`` (S), on-demand, GSI
    `STATUS_INDEX` (``status`` S, ``received_at`` N, projection ALL), TTL on
    `TTL_ATTRIBUTE`. Enable TTL with ``update_time_to_live`` after creation.
    """
    return {
        "TableName": table_name,
        "AttributeDefinitions": [
            {"AttributeName": "id", "AttributeType": "S"},
            {"AttributeName": "status", "AttributeType": "S"},
            {"AttributeName": "received_at", "AttributeType": "N"},
        ],
        "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [_status_index()],
        "BillingMode": "PAY_PER_REQUEST",
    }


def status_index_update() -> dict[str, Any]:
    """``update_table`` arguments that add `STATUS_INDEX` to a table created without it."""
    schema = table_schema("unused")
    return {
        "AttributeDefinitions": schema["AttributeDefinitions"],
        "GlobalSecondaryIndexUpdates": [{"Create": _status_index()}],
    }


def _status_index() -> dict[str, Any]:
    return {
        "IndexName": STATUS_INDEX,
        "KeySchema": [
            {"AttributeName": "status", "KeyType": "HASH"},
            {"AttributeName": "received_at", "KeyType": "RANGE"},
        ],
        "Projection": {"ProjectionType": "ALL"},
    }


class CancelOutcome(StrEnum):
    #: It was queued: now `cancelled`, and the caller owns (must publish) its callback.
    CANCELLED = "cancelled"
    #: It is running: the flag is set; the pod stops between steps and claims `cancelled`.
    CANCEL_REQUESTED = "cancel_requested"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


class WebhookStatus(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"  # retries exhausted, or a 4xx the receiver will not change its mind on
    REFUSED = "refused"  # the URL guard refused the address: no connection was made


class TaskRecord(BaseModel):
    """One task as the table holds it. Times are epoch milliseconds except `expires_at`."""

    id: str
    status: TaskStatus
    runtime: str | None = None
    tasktype: str | None = None
    model: str | None = None
    prefix: str | None = None
    webhook: str | None = None
    context: Any = None
    attempts: int = 0
    received_at: int | None = None
    published_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    updated_at: int | None = None
    pod: str | None = None
    progress_done: int | None = None
    progress_total: int | None = None
    #: Steps the task is expected to run, known from its content before it starts.
    planned_steps: int | None = None
    cancel_requested: bool = False
    seed: int | None = None
    result: bool | None = None
    output_location: str | None = None
    output_url: str | None = None
    image_url: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    error: ErrorInfo | None = None
    timings: Timings | None = None
    #: The terminal callback as claimed (JSON), kept so a lost publish can be redone.
    callback: str | None = None
    callback_published: bool | None = None
    webhook_status: WebhookStatus | None = None
    webhook_attempts: int | None = None
    webhook_http_status: int | None = None
    webhook_error: str | None = None
    webhook_at: int | None = None
    #: Publishes of this id received after it ended (dropped, not rendered), and the last.
    republished: int = 0
    republished_at: int | None = None
    expires_at: int | None = None
    #: Which delivery of the task serves it (`Reporter.admit`): the first to arrive.
    delivery: str | None = None
    #: The render attempt that last marked it running (a token each pod job draws): only
    #: that attempt may write outputs, record progress or claim the end (`mark_running`).
    run: str | None = None

    @property
    def queued_ms(self) -> int | None:
        """Publish (else receipt) to render start: the serverless worker's `delayTime`."""
        start = self.published_at or self.received_at
        if self.started_at is None or start is None:
            return None
        return max(0, self.started_at - start)

    @property
    def execution_ms(self) -> int | None:
        """Render start to terminal state: the serverless worker's `executionTime`."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0, self.finished_at - self.started_at)

    def terminal_callback(self) -> Callback | None:
        return Callback.model_validate_json(self.callback) if self.callback else None

    def cancelled_callback(self, now_ms: int, message: str = "cancelled while queued") -> Callback:
        """The `cancelled` callback of a task no pod is reporting, from what the table knows."""
        start = self.published_at or self.received_at or now_ms
        return Callback(
            id=self.id,
            runtime=self.runtime,
            tasktype=self.tasktype,
            status=TaskStatus.CANCELLED,
            result=False,
            context=self.context,
            error=ErrorInfo(code="cancelled", message=message),
            timings=Timings(queued_ms=max(0, now_ms - start), total_ms=max(0, now_ms - start)),
        )


class _Update:
    """Builds one UpdateItem's expressions with every name and value as a placeholder
    (``status`` and friends are DynamoDB reserved words)."""

    def __init__(self) -> None:
        self._set: list[str] = []
        self._add: list[str] = []
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}

    def name(self, attr: str) -> str:
        self.names[f"#{attr}"] = attr
        return f"#{attr}"

    def value(self, value: Any) -> str:
        key = f":v{len(self.values)}"
        self.values[key] = _SERIALIZER.serialize(value)
        return key

    def set(self, attr: str, value: Any) -> _Update:
        self._set.append(f"{self.name(attr)} = {self.value(value)}")
        return self

    def set_if_absent(self, attr: str, value: Any) -> _Update:
        name = self.name(attr)
        self._set.append(f"{name} = if_not_exists({name}, {self.value(value)})")
        return self

    def add(self, attr: str, value: int) -> _Update:
        self._add.append(f"{self.name(attr)} {self.value(value)}")
        return self

    def terminal_values(self) -> str:
        return ", ".join(self.value(s) for s in _TERMINAL)

    def kwargs(self, condition: str | None = None) -> dict[str, Any]:
        expression = "SET " + ", ".join(self._set)
        if self._add:
            expression += " ADD " + ", ".join(self._add)
        out: dict[str, Any] = {
            "UpdateExpression": expression,
            "ExpressionAttributeNames": self.names,
            "ExpressionAttributeValues": self.values,
        }
        if condition:
            out["ConditionExpression"] = condition
        return out


class TaskTable:
    """Async access to the task table through an injected DynamoDB client: aiobotocore
    in services; a boto3 client works too (calls then block, fine for a CLI)."""

    def __init__(
        self,
        client: Any,
        table_name: str,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"`ttl_s` must be positive, got {ttl_s}")
        self._client = client
        self.table_name = table_name
        self.ttl_s = ttl_s
        self._clock = clock

    # --- lifecycle writes ---------------------------------------------------

    async def record_queued(
        self, task: Task, *, published_at: float | None = None, delivery: str | None = None
    ) -> TaskRecord:
        """The dispatcher received `task` (first delivery, redelivery or republish).

        Creates the item as `queued`, or counts one more attempt on a live,
        unfinished one without regressing its status. A live *terminal* item
        is returned untouched: the caller must not render it again (and not
        publish anything). An expired item is replaced by a fresh one.
        `published_at` is the SNS publish time in epoch seconds. `delivery` names
        this copy of the message; the first one recorded is kept (`TaskRecord.delivery`),
        so the caller can tell another copy (SNS fan-out, a republish) from a redelivery.
        """
        for _ in range(3):
            now_ms, now_s = self._now()
            u = _Update()
            for attr, value in _descriptive_fields(task).items():
                u.set_if_absent(attr, value)
            u.set_if_absent("status", TaskStatus.QUEUED.value)
            u.set_if_absent("received_at", now_ms)
            if published_at is not None:
                u.set_if_absent("published_at", int(published_at * 1000))
            if delivery is not None:
                u.set_if_absent("delivery", delivery)
            u.set("updated_at", now_ms).set(TTL_ATTRIBUTE, now_s + self.ttl_s).add("attempts", 1)
            condition = (
                f"attribute_not_exists({u.name('id')}) OR {_partial(u)} OR ({u.name(TTL_ATTRIBUTE)} > "
                f"{u.value(now_s)} AND NOT {u.name('status')} IN ({u.terminal_values()}))"
            )
            try:
                answer = await self._update(task.id, u, condition, ReturnValues="ALL_NEW")
                return _record(answer["Attributes"])
            except _ConditionFailed as lost:
                old = _record_or_none(lost.item) if lost.item else None
                old = old or await self.get(task.id, live=False)
            if old is None:
                continue  # deleted between the two calls: try again
            if not self._expired(old, now_s):
                log.info("task %s is already %s; not queueing it again", task.id, old.status)
                if old.status.terminal and _is_new_publish(old, published_at):
                    return await self._note_republish(old, now_ms)
                return old
            if await self._replace_expired(task, published_at, now_ms, now_s, delivery):
                return await self._require(task.id)
        raise TaskTableError(f"could not record task {task.id} as queued", task_id=task.id)

    async def _note_republish(self, old: TaskRecord, now_ms: int) -> TaskRecord:
        """Count a new publish of an id that already ended, so `sdeks status` can say
        why nothing happened. The TTL is left alone: republishing must not extend the
        idempotency window."""
        u = _Update().add("republished", 1).set("republished_at", now_ms)
        try:
            answer = await self._update(old.id, u, _whole(u), ReturnValues="ALL_NEW")
        except _ConditionFailed:
            return old
        log.warning(
            "task %s already ended (%s); a new publish of it was dropped", old.id, old.status
        )
        return _record(answer["Attributes"])

    async def mark_running(
        self,
        task_id: str,
        *,
        pod: str | None = None,
        total_steps: int | None = None,
        run: str | None = None,
    ) -> bool:
        """A pod starts rendering. False: the task is finished or cancel was requested,
        so the pod must not render it (and publishes nothing).

        `run` names this render attempt. A running task may be started again (its
        pod or dispatcher died and the message came back); the new attempt's `run`
        replaces the old one's, which fences the old attempt out: its progress
        writes, `may_write_outputs` and terminal claim fail from then on, so a
        straggling pod can neither overwrite the new attempt's outputs nor report."""
        now_ms, now_s = self._now()
        u = _Update()
        u.set("status", TaskStatus.RUNNING.value).set("started_at", now_ms)
        u.set("updated_at", now_ms).set(TTL_ATTRIBUTE, now_s + self.ttl_s)
        u.set("progress_done", 0).set_if_absent("received_at", now_ms)
        if pod:
            u.set("pod", pod)
        if run:
            u.set("run", run)
        if total_steps is not None:
            u.set("progress_total", total_steps)
        # A missing (or partial) item is created: the table write at receipt may have
        # failed, and a lost status row must not stop a render.
        condition = (
            f"attribute_not_exists({u.name('id')}) OR {_partial(u)} OR ({u.name('status')} IN "
            f"({u.value(TaskStatus.QUEUED.value)}, {u.value(TaskStatus.RUNNING.value)}) "
            f"AND {_not_cancelled(u)})"
        )
        return await self._try(task_id, u, condition)

    async def update_progress(
        self, task_id: str, done: int, total: int, *, run: str | None = None
    ) -> bool:
        """Record steps done. False: stop rendering (cancel requested, not running, or
        another attempt `run` took the task over)."""
        now_ms, _ = self._now()
        u = _Update().set("progress_done", done).set("progress_total", total)
        u.set("updated_at", now_ms)
        condition = (
            f"{u.name('status')} = {u.value(TaskStatus.RUNNING.value)} AND {_not_cancelled(u)}"
            f"{_own_run(u, run)}"
        )
        return await self._try(task_id, u, condition)

    async def may_write_outputs(self, task_id: str, *, run: str) -> bool:
        """Just before a pod writes outputs: True while attempt `run` still holds the
        running task (a requested cancel still lets it write its `cancelled` manifest).
        False: another attempt took it over or it ended; write nothing."""
        now_ms, _ = self._now()
        u = _Update().set("outputs_at", now_ms)
        condition = f"{u.name('status')} = {u.value(TaskStatus.RUNNING.value)}{_own_run(u, run)}"
        return await self._try(task_id, u, condition)

    async def claim_terminal(
        self,
        callback: Callback,
        *,
        new_only: bool = False,
        delivery: str | None = None,
        run: str | None = None,
    ) -> bool:
        """Move the task to the callback's terminal status, if nobody did yet.

        Exactly one caller per task id gets True; it alone publishes the
        callback. The callback is stored so a publish lost to a crash can be
        redone (`claim_republish`). `new_only`: claim only an id no live task
        holds (a message refused before admission must not end another's task).
        `delivery`: the copy of the message that claims (a refusal), stored in
        `TaskRecord.delivery` so another copy can tell it from a redelivery.
        """
        if callback.id is None:
            raise ValueError("a callback without an id cannot be claimed")
        if not callback.status.terminal:
            raise ValueError(f"claim_terminal needs a terminal status, got {callback.status}")
        _, now_s = self._now()
        u = self._terminal_update(callback)
        if delivery is not None:
            u.set("delivery", delivery)
        expired = f"{u.name(TTL_ATTRIBUTE)} <= {u.value(now_s)}"
        live = (
            ""
            if new_only
            else f"(NOT {u.name('status')} IN ({u.terminal_values()}){_own_run(u, run)}) OR "
        )
        condition = f"attribute_not_exists({u.name('id')}) OR {_partial(u)} OR {live}{expired}"
        won = await self._try(callback.id, u, condition)
        if not won:
            log.info("task %s already finished; %s not claimed", callback.id, callback.status)
        return won

    async def mark_published(self, task_id: str) -> None:
        """The claimed callback is on the topic."""
        now_ms, _ = self._now()
        u = _Update().set("callback_published", True).set("updated_at", now_ms)
        if not await self._try(task_id, u, _whole(u)):
            log.warning("task %s: no record to mark the callback published on", task_id)

    async def claim_republish(self, task_id: str, *, stale_after_s: float) -> Callback | None:
        """The stored callback of a task whose winner claimed but never confirmed the
        publish within `stale_after_s` (it crashed, or SNS failed): the caller gets it,
        once per `stale_after_s`, and publishes it."""
        now_ms, _ = self._now()
        cutoff = now_ms - int(stale_after_s * 1000)
        u = _Update().set("republish_at", now_ms)
        republish_at = u.name("republish_at")
        condition = (
            f"{u.name('callback_published')} = {u.value(False)} AND "
            f"{u.name('finished_at')} <= {u.value(cutoff)} AND "
            f"(attribute_not_exists({republish_at}) OR {republish_at} <= {u.value(cutoff)})"
        )
        try:
            answer = await self._update(task_id, u, condition, ReturnValues="ALL_NEW")
        except _ConditionFailed:
            return None
        return _record(answer["Attributes"]).terminal_callback()

    async def request_cancel(self, task_id: str) -> tuple[CancelOutcome, TaskRecord | None]:
        """Cancel a task. Queued: it becomes `cancelled` now and the caller must publish
        ``record.terminal_callback()``. Running: `cancel_requested` is set."""
        for _ in range(5):
            record = await self.get(task_id)
            if record is None:
                return CancelOutcome.NOT_FOUND, None
            if record.status.terminal:
                return CancelOutcome.ALREADY_FINISHED, record
            now_ms, _ = self._now()
            if record.status is TaskStatus.QUEUED:
                u = self._terminal_update(record.cancelled_callback(now_ms))
                u.set("cancel_requested", True)
                condition = f"{u.name('status')} = {u.value(TaskStatus.QUEUED.value)}"
                if await self._try(task_id, u, condition):
                    return CancelOutcome.CANCELLED, await self._require(task_id)
            else:
                u = _Update().set("cancel_requested", True).set("updated_at", now_ms)
                condition = f"{u.name('status')} = {u.value(TaskStatus.RUNNING.value)}"
                if await self._try(task_id, u, condition):
                    return CancelOutcome.CANCEL_REQUESTED, await self._require(task_id)
            # The status moved between our read and our write: look again.
        raise TaskTableError(f"could not cancel task {task_id}: it keeps changing", task_id=task_id)

    async def remember_seed(self, task_id: str, seed: int) -> int:
        """Store `seed` as the task's resolved seed unless one is stored already, and
        return the stored one, so every attempt of a ``seed: -1`` task renders the same
        image. Without an item (table write failed at receipt) `seed` is returned."""
        u = _Update().set_if_absent("seed", seed)
        try:
            answer = await self._update(task_id, u, _whole(u), ReturnValues="ALL_NEW")
        except _ConditionFailed:
            return seed
        return int(_plain(answer["Attributes"]["seed"]))

    async def record_webhook_outcome(
        self,
        task_id: str,
        *,
        status: WebhookStatus,
        attempts: int,
        http_status: int | None = None,
        error: str | None = None,
    ) -> None:
        now_ms, _ = self._now()
        u = _Update().set("webhook_status", WebhookStatus(status).value)
        u.set("webhook_attempts", attempts).set("webhook_at", now_ms)
        u.set("webhook_http_status", http_status).set("webhook_error", (error or None))
        if not await self._try(task_id, u, _whole(u)):
            log.warning("task %s: no item to record the webhook outcome on", task_id)

    # --- reads ----------------------------------------------------------------

    async def get(self, task_id: str, *, live: bool = True) -> TaskRecord | None:
        """The task, or None when unknown, partial (no status) or, with `live`, expired."""
        try:
            answer = await call(
                self._client,
                "get_item",
                TableName=self.table_name,
                Key={"id": {"S": task_id}},
                ConsistentRead=True,
            )
        except ClientError as exc:
            raise _table_error(exc, task_id) from exc
        item = answer.get("Item")
        if not item:
            return None
        record = _record_or_none(item)
        if record is None:
            return None
        if live and self._expired(record, self._now()[1]):
            return None
        return record

    async def list_recent(
        self, status: TaskStatus | str | None = None, *, limit: int = 20
    ) -> list[TaskRecord]:
        """Newest first by `received_at`. One GSI query per status asked for."""
        if limit < 1:
            raise ValueError(f"`limit` must be at least 1, got {limit}")
        statuses = [TaskStatus(status)] if status else list(TaskStatus)
        now_s = self._now()[1]
        records: list[TaskRecord] = []
        for one in statuses:
            answer = await self._query_index(one, limit=limit)
            items = _records(answer.get("Items", []))
            records.extend(r for r in items if not self._expired(r, now_s))
        records.sort(key=lambda r: r.received_at or 0, reverse=True)
        return records[:limit]

    async def count_queued_before(self, record: TaskRecord, *, max_pages: int = 20) -> int:
        """Queued tasks of the same runtime received before `record`: an estimate of its
        queue position (SQS standard queues do not keep order). A lower bound when more
        than `max_pages` pages would be needed."""
        if record.received_at is None:
            return 0
        count, start_key = 0, None
        for _ in range(max_pages):
            answer = await self._query_index(
                TaskStatus.QUEUED,
                received_before=record.received_at,
                runtime=record.runtime or "",
                count_only=True,
                start_key=start_key,
            )
            count += int(answer.get("Count", 0))
            start_key = answer.get("LastEvaluatedKey")
            if not start_key:
                break
        return count

    async def recent_durations_ms(
        self, runtime: str | None, *, count: int = 20, max_pages: int = 5
    ) -> list[int]:
        """Execution times (start to finish) of the runtime's latest succeeded tasks."""
        renders = await self.recent_renders(runtime, count=count, max_pages=max_pages)
        return [ms for ms, _ in renders]

    async def recent_renders(
        self, runtime: str | None, *, count: int = 20, max_pages: int = 5
    ) -> list[tuple[int, int | None]]:
        """(execution ms, steps) of the runtime's latest succeeded tasks, newest first:
        what an ETA learns a time per step from."""
        out: list[tuple[int, int | None]] = []
        start_key = None
        for _ in range(max_pages):
            answer = await self._query_index(
                TaskStatus.SUCCEEDED, limit=max(count, 25), runtime=runtime, start_key=start_key
            )
            for record in _records(answer.get("Items", [])):
                if record.execution_ms is not None:
                    out.append((record.execution_ms, record.progress_total))
            start_key = answer.get("LastEvaluatedKey")
            if len(out) >= count or not start_key:
                break
        return out[:count]

    # --- internals ------------------------------------------------------------

    def _now(self) -> tuple[int, int]:
        now = self._clock()
        return int(now * 1000), int(now)

    @staticmethod
    def _expired(record: TaskRecord, now_s: int) -> bool:
        return record.expires_at is not None and record.expires_at <= now_s

    def _terminal_update(self, callback: Callback) -> _Update:
        now_ms, now_s = self._now()
        u = _Update()
        u.set("status", callback.status.value).set("finished_at", now_ms)
        u.set("updated_at", now_ms).set(TTL_ATTRIBUTE, now_s + self.ttl_s)
        u.set_if_absent("received_at", now_ms)
        if callback.runtime:
            u.set_if_absent("runtime", callback.runtime)
        if callback.tasktype:
            u.set_if_absent("tasktype", callback.tasktype)
        u.set("result", callback.result).set("image_url", list(callback.image_url))
        u.set("seeds", list(callback.seeds))
        u.set("timings", callback.timings.model_dump())
        u.set("output_location", callback.output_location)
        u.set("output_url", callback.output_url)
        u.set("error", callback.error.model_dump() if callback.error else None)
        u.set("callback", callback.model_dump_json()).set("callback_published", False)
        return u

    async def _replace_expired(
        self,
        task: Task,
        published_at: float | None,
        now_ms: int,
        now_s: int,
        delivery: str | None = None,
    ) -> bool:
        item: dict[str, Any] = {
            "id": task.id,
            "status": TaskStatus.QUEUED.value,
            "attempts": 1,
            "received_at": now_ms,
            "updated_at": now_ms,
            TTL_ATTRIBUTE: now_s + self.ttl_s,
            **_descriptive_fields(task),
        }
        if published_at is not None:
            item["published_at"] = int(published_at * 1000)
        if delivery is not None:
            item["delivery"] = delivery
        try:
            await call(
                self._client,
                "put_item",
                TableName=self.table_name,
                Item={k: _SERIALIZER.serialize(v) for k, v in item.items()},
                ConditionExpression="attribute_not_exists(#id) OR #ttl <= :now",
                ExpressionAttributeNames={"#id": "id", "#ttl": TTL_ATTRIBUTE},
                ExpressionAttributeValues={":now": {"N": str(now_s)}},
            )
        except ClientError as exc:
            if _is_condition_failure(exc):
                return False
            raise _table_error(exc, task.id) from exc
        log.info("task %s: expired record replaced by a new queued one", task.id)
        return True

    async def _require(self, task_id: str) -> TaskRecord:
        record = await self.get(task_id, live=False)
        if record is None:
            raise TaskTableError(f"task {task_id} vanished from the table", task_id=task_id)
        return record

    async def _try(self, task_id: str, u: _Update, condition: str) -> bool:
        try:
            await self._update(task_id, u, condition)
        except _ConditionFailed:
            return False
        return True

    async def _update(
        self, task_id: str, u: _Update, condition: str | None, **extra: Any
    ) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = await call(
                self._client,
                "update_item",
                TableName=self.table_name,
                Key={"id": {"S": task_id}},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **u.kwargs(condition),
                **extra,
            )
            return answer
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise _ConditionFailed(exc.response.get("Item")) from exc
            raise _table_error(exc, task_id) from exc

    async def _query_index(
        self,
        status: TaskStatus,
        *,
        received_before: int | None = None,
        runtime: str | None = None,
        limit: int | None = None,
        count_only: bool = False,
        start_key: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One page of `STATUS_INDEX` for `status`, newest first."""
        u = _Update()
        key = f"{u.name('status')} = {u.value(status.value)}"
        if received_before is not None:
            key += f" AND {u.name('received_at')} < {u.value(received_before)}"
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": STATUS_INDEX,
            "KeyConditionExpression": key,
            "ScanIndexForward": False,
        }
        if runtime is not None:  # filters after the read: costs reads, not correctness
            kwargs["FilterExpression"] = f"{u.name('runtime')} = {u.value(runtime)}"
        kwargs["ExpressionAttributeNames"] = u.names
        kwargs["ExpressionAttributeValues"] = u.values
        if limit is not None:
            kwargs["Limit"] = limit
        if count_only:
            kwargs["Select"] = "COUNT"
        if start_key:
            kwargs["ExclusiveStartKey"] = start_key
        try:
            answer: dict[str, Any] = await call(self._client, "query", **kwargs)
            return answer
        except ClientError as exc:
            raise _table_error(exc, None) from exc


class _ConditionFailed(Exception):
    def __init__(self, item: dict[str, Any] | None) -> None:
        super().__init__("condition failed")
        self.item = item


async def call(client: Any, operation: str, **kwargs: Any) -> Any:
    """Call an aiobotocore client, or a plain boto3 one (the CLI, whose core install
    has no aiobotocore): the same code then serves services and command line."""
    answer = getattr(client, operation)(**kwargs)
    return await answer if inspect.isawaitable(answer) else answer


def _partial(u: _Update) -> str:
    """An item holding no status (see the module docstring): a write that may create
    an item treats it as absent and completes it."""
    return f"attribute_not_exists({u.name('status')})"


def _whole(u: _Update) -> str:
    """A record exists: the condition of every write that must not create an item.
    On the status, not the key, so a partial item is not given more fields."""
    return f"attribute_exists({u.name('status')})"


def _own_run(u: _Update, run: str | None) -> str:
    """`` AND`` the item is held by render attempt `run` (or by none); empty without one."""
    if run is None:
        return ""
    name = u.name("run")
    return f" AND (attribute_not_exists({name}) OR {name} = {u.value(run)})"


def _not_cancelled(u: _Update) -> str:
    flag = u.name("cancel_requested")
    return f"(attribute_not_exists({flag}) OR {flag} = {u.value(False)})"


def _descriptive_fields(task: Task) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "runtime": task.runtime,
        "tasktype": task.tasktype.value,
        "prefix": task.prefix,
    }
    if task.model:
        fields["model"] = task.model
    steps = planned_steps(task.content)
    if steps is not None:
        fields["planned_steps"] = steps
    if task.webhook:
        fields["webhook"] = task.webhook
    if task.context is not None:
        context = json.dumps(task.context, separators=(",", ":"))
        if len(context.encode()) <= MAX_STORED_CONTEXT_BYTES:
            fields["context"] = context
    return fields


def planned_steps(content: Mapping[str, Any]) -> int | None:
    """Denoising steps a generation task will run (`steps` x `n_iter`, A1111 defaults
    50 and 1), as the pod counts progress; None when the content says otherwise."""
    return count_of(content, {"steps": 50, "n_iter": 1})


def _is_new_publish(record: TaskRecord, published_at: float | None) -> bool:
    """A delivery from another SNS publish than the one recorded (not a redelivery,
    which carries the same publish time)."""
    if published_at is None:
        return False
    return record.published_at is None or int(published_at * 1000) != record.published_at


def _is_condition_failure(exc: ClientError) -> bool:
    return bool(exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException")


def _table_error(exc: ClientError, task_id: str | None) -> TaskTableError:
    error = exc.response.get("Error", {})
    message = f"task table: {error.get('Code', 'error')}: {error.get('Message', exc)}"
    return TaskTableError(message[:500], task_id=task_id)


def _plain(value: Any) -> Any:
    """DynamoDB attribute value -> Python, numbers as int (we store no fractions)."""
    value = _DESERIALIZER.deserialize(value) if isinstance(value, dict) else value
    return _from_decimal(value)


def _from_decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value)
    if isinstance(value, list):
        return [_from_decimal(v) for v in value]
    if isinstance(value, set):
        return sorted(_from_decimal(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_decimal(v) for k, v in value.items()}
    return value


def _record(item: Mapping[str, Any]) -> TaskRecord:
    fields = {key: _plain(value) for key, value in item.items()}
    if isinstance(fields.get("context"), str):
        fields["context"] = json.loads(fields["context"])
    known = {k: v for k, v in fields.items() if k in TaskRecord.model_fields and v is not None}
    return TaskRecord.model_validate(known)


def _record_or_none(item: Mapping[str, Any]) -> TaskRecord | None:
    """The record, or None for an item that is not one (partial, or a field of the
    wrong type): a reader must not crash on an item it cannot use."""
    try:
        return _record(item)
    except (ValidationError, ValueError) as exc:
        log.warning("task table: item %r is not a task record, ignored: %s", _item_id(item), exc)
        return None


def _records(items: list[Mapping[str, Any]]) -> list[TaskRecord]:
    return [r for r in map(_record_or_none, items) if r is not None]


def _item_id(item: Mapping[str, Any]) -> str | None:
    key = item.get("id")
    return str(key.get("S")) if isinstance(key, Mapping) else None
