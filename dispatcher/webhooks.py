"""The `webhooks` queue consumer: terminal callbacks in, signed POSTs out.

docs/lifecycle.md puts webhook delivery in the dispatcher: a `webhooks` SQS
queue subscribed to the callback topic (terminal statuses only) carries every
terminal callback, whoever published it; this loop hands each one to
`sdeks.webhooks.deliver_notification`, which looks up the task's webhook URL
in the task table, POSTs the signed callback with retries, and records the
outcome. The URL is untrusted: every attempt is checked by the same SSRF
guard as image links (`LinkResolver.check_url`) and sent through its session,
whose connector only connects to the addresses that check approved.

Each receive takes up to 10 messages (the SQS maximum), never more than
there are free delivery slots, and delivers them concurrently; `concurrency`
caps the deliveries in flight. A message is deleted once its delivery ended
(delivered, failed or refused); an error of our own (task table down) keeps
it for a later receive. Deliveries with their backoff can outlast the
visibility timeout, so they hold leases like tasks do.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dispatcher.leases import LeaseKeeper
from sdeks.tasks import TaskTable
from sdeks.webhooks import WebhookSender, deliver_notification

log = logging.getLogger(__name__)

#: SQS returns at most 10 messages per ReceiveMessage.
_SQS_BATCH = 10


class WebhookConsumer:
    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        *,
        table: TaskTable,
        sender: WebhookSender,
        leases: LeaseKeeper,
        concurrency: int = 16,
        wait_s: int = 10,
    ) -> None:
        self._sqs = sqs
        self.queue_url = queue_url
        self._table = table
        self._sender = sender
        self._leases = leases
        self._slots = asyncio.Semaphore(concurrency)
        self._wait_s = wait_s
        self._running: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Consume until cancelled; deliveries in flight are cancelled with it."""
        try:
            while True:
                slots = await self._take_slots()
                try:
                    answer = await self._sqs.receive_message(
                        QueueUrl=self.queue_url,
                        MaxNumberOfMessages=slots,
                        WaitTimeSeconds=self._wait_s,
                    )
                except (ClientError, BotoCoreError):
                    self._give_back(slots)
                    log.warning("receive from the webhooks queue failed", exc_info=True)
                    await asyncio.sleep(2)
                    continue
                except BaseException:
                    self._give_back(slots)
                    raise
                messages = answer.get("Messages", [])[:slots]
                self._give_back(slots - len(messages))
                for message in messages:  # each delivery gives its slot back when it ends
                    task = asyncio.create_task(self._deliver(message))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
        finally:
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _take_slots(self) -> int:
        """Wait for one free delivery slot, then take any others free, up to a batch."""
        await self._slots.acquire()
        taken = 1
        # An unlocked semaphore's acquire returns at once: no cancellation point here.
        while taken < _SQS_BATCH and not self._slots.locked():
            await self._slots.acquire()
            taken += 1
        return taken

    def _give_back(self, slots: int) -> None:
        for _ in range(slots):
            self._slots.release()

    async def _deliver(self, message: dict[str, Any]) -> None:
        lease = self._leases.hold(self.queue_url, message["ReceiptHandle"], message["MessageId"])
        try:
            await deliver_notification(message["Body"], table=self._table, sender=self._sender)
            await self._leases.delete(lease)
        except asyncio.CancelledError:
            await self._leases.release(lease)
            raise
        except Exception:
            log.exception("webhook notification %s kept for a retry", lease.message_id)
        finally:
            self._leases.forget(lease)
            self._slots.release()
