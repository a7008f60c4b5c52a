"""SQS leases: a received message stays invisible to everyone else while the
dispatcher holds it, for as long as its task waits or runs.

SQS hides a received message for the queue's VisibilityTimeout, then hands it
out again. Rendering can outlast that, so one heartbeat loop extends every
held message with `ChangeMessageVisibilityBatch` (10 per call, per queue)
every `interval_s`, each time by `extension_s`. A message is deleted only
after its terminal callback exists, or released (visibility 0, or a delay)
so that SQS counts another receive and, past maxReceiveCount, moves it to
the DLQ. A lease whose receipt handle SQS no longer accepts is marked lost:
someone else may now hold the message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)

_BATCH = 10  # SQS limit per *Batch call

_ids = itertools.count(1)


@dataclass(eq=False)
class Lease:
    queue_url: str
    receipt_handle: str
    message_id: str
    runtime: str | None = None
    task_id: str | None = None
    received_at: float = field(default_factory=time.monotonic)
    lost: bool = False
    key: str = field(default_factory=lambda: f"l{next(_ids)}")


class LeaseKeeper:
    def __init__(
        self,
        sqs: Any,
        *,
        extension_s: int,
        interval_s: float,
        delete_delay_s: float = 0.005,
        on_lost: Callable[[Lease], None] | None = None,
    ) -> None:
        if interval_s >= extension_s:
            raise ValueError(
                f"heartbeat interval ({interval_s:g} s) must be shorter than the "
                f"extension ({extension_s} s), or held messages become visible again"
            )
        self._sqs = sqs
        self._on_lost = on_lost
        self.extension_s = extension_s
        self.interval_s = interval_s
        self._held: dict[str, Lease] = {}
        # Deletes wait `delete_delay_s` for company, then go out 10 per call:
        # one DeleteMessageBatch instead of ten round trips under load.
        self.delete_delay_s = delete_delay_s
        self._deletes: dict[str, list[tuple[Lease, asyncio.Future[None]]]] = defaultdict(list)
        self._flushes: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._held)

    def hold(
        self, queue_url: str, receipt_handle: str, message_id: str, *, runtime: str | None = None
    ) -> Lease:
        lease = Lease(queue_url, receipt_handle, message_id, runtime=runtime)
        self._held[lease.key] = lease
        return lease

    def forget(self, lease: Lease) -> None:
        self._held.pop(lease.key, None)

    async def delete(self, lease: Lease) -> None:
        """Delete the message: its terminal callback exists. Returns once SQS answered."""
        self.forget(lease)
        pending = self._deletes[lease.queue_url]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.append((lease, done))
        if len(pending) == 1:
            flush = asyncio.create_task(self._flush_deletes(lease.queue_url))
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        await asyncio.shield(done)

    async def _flush_deletes(self, queue_url: str) -> None:
        await asyncio.sleep(self.delete_delay_s)
        batch = self._deletes.pop(queue_url, [])
        calls = [
            self._delete_batch(queue_url, batch[i : i + _BATCH])
            for i in range(0, len(batch), _BATCH)
        ]
        await asyncio.gather(*calls)

    async def _delete_batch(
        self, queue_url: str, batch: list[tuple[Lease, asyncio.Future[None]]]
    ) -> None:
        entries = [{"Id": lease.key, "ReceiptHandle": lease.receipt_handle} for lease, _ in batch]
        failed: list[dict[str, Any]] = []
        try:
            answer = await self._sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            failed = answer.get("Failed", [])
        except (ClientError, BotoCoreError) as exc:
            failed = [{"Id": e["Id"], "Code": type(exc).__name__} for e in entries]
        by_key = {lease.key: lease for lease, _ in batch}
        for failure in failed:
            lease = by_key.get(failure.get("Id", ""))
            if lease is not None:
                # The task is done; a redelivery is dropped by the task table (or rendered
                # again, idempotently by key, without one).
                log.warning(
                    "could not delete message %s: %s",
                    lease.message_id,
                    failure.get("Code"),
                    extra={"task_id": lease.task_id},
                )
        for _, done in batch:
            if not done.done():
                done.set_result(None)

    async def release(self, lease: Lease, *, delay_s: int = 0) -> None:
        """Make the message visible again after `delay_s`: SQS counts another receive."""
        self.forget(lease)
        try:
            await self._sqs.change_message_visibility(
                QueueUrl=lease.queue_url,
                ReceiptHandle=lease.receipt_handle,
                VisibilityTimeout=max(0, int(delay_s)),
            )
        except (ClientError, BotoCoreError):
            log.warning(
                "could not release message %s; it reappears when its visibility lapses",
                lease.message_id,
                exc_info=True,
                extra={"task_id": lease.task_id},
            )

    async def run(self) -> None:
        """The heartbeat loop; cancel it to stop."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.heartbeat()
            except Exception:  # one bad beat must not end the loop: leases would lapse
                log.exception("visibility heartbeat failed")

    async def heartbeat(self) -> int:
        """Extend every held lease once; returns how many were extended."""
        by_queue: dict[str, list[Lease]] = defaultdict(list)
        for lease in list(self._held.values()):
            if not lease.lost:
                by_queue[lease.queue_url].append(lease)
        calls = [
            self._extend(queue_url, leases[i : i + _BATCH])
            for queue_url, leases in by_queue.items()
            for i in range(0, len(leases), _BATCH)
        ]
        counts = await asyncio.gather(*calls)
        return sum(counts)

    async def _extend(self, queue_url: str, leases: list[Lease]) -> int:
        entries = [
            {
                "Id": lease.key,
                "ReceiptHandle": lease.receipt_handle,
                "VisibilityTimeout": self.extension_s,
            }
            for lease in leases
        ]
        try:
            answer = await self._sqs.change_message_visibility_batch(
                QueueUrl=queue_url, Entries=entries
            )
        except (ClientError, BotoCoreError):
            # Transient: the next beat retries, well within the extension.
            log.warning("visibility heartbeat failed for %d messages", len(leases), exc_info=True)
            return 0
        by_key = {lease.key: lease for lease in leases}
        for failure in answer.get("Failed", []):
            lease = by_key.get(failure.get("Id", ""))
            if lease is None:
                continue
            if failure.get("SenderFault", True):
                lease.lost = True
                if self._on_lost is not None:
                    self._on_lost(lease)
                log.warning(
                    "lease on message %s lost: %s",
                    lease.message_id,
                    failure.get("Code"),
                    extra={"task_id": lease.task_id},
                )
        return len(answer.get("Successful", []))
