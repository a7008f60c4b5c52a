"""The queues the dispatcher consumes: what each is, and how many of its
messages may be held at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dispatcher.settings import DispatcherSettings
from sdeks.aio import wait_event


@dataclass(frozen=True)
class Source:
    """One queue the dispatcher consumes."""

    queue_url: str
    #: The runtime this queue serves; None for the catch-all.
    runtime: str | None
    max_receive_count: int

    @property
    def name(self) -> str:
        return self.runtime or "catch-all"


class Window:
    """At most `size` messages of one queue held at once.

    `size` may be a function, read at every reservation: the window then
    follows the fleet (`DispatcherSettings.window_for`). A window that
    shrinks below what is held just stops receiving until enough ends.
    """

    def __init__(self, size: int | Callable[[], int]) -> None:
        self._size = size
        self.used = 0
        self._room = asyncio.Event()
        self._room.set()

    @property
    def size(self) -> int:
        return self._size() if callable(self._size) else self._size

    async def reserve(self, most: int) -> int:
        while self.used >= self.size:
            self._room.clear()
            # A growing fleet makes room without any message ending: look again.
            await wait_event(self._room, 1.0)
        n = min(most, self.size - self.used)
        self.used += n
        return n

    def free(self, n: int = 1) -> None:
        self.used -= n
        self._room.set()


async def queue_sources(sqs: Any, settings: DispatcherSettings) -> list[Source]:
    """The queues to consume, with each one's maxReceiveCount read from its RedrivePolicy."""
    sources = []
    queues: list[tuple[str, str | None]] = [(url, rt) for rt, url in settings.queues.items()]
    if settings.catch_all_queue_url:
        queues.append((settings.catch_all_queue_url, None))
    for url, runtime in queues:
        max_receive = settings.max_receive_count
        with contextlib.suppress(ClientError, BotoCoreError, ValueError, KeyError):
            attributes = (
                await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
            )["Attributes"]
            max_receive = int(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"])
        sources.append(Source(url, runtime, max_receive))
    return sources


async def queue_visibility(sqs: Any, urls: list[str]) -> int | None:
    """The shortest VisibilityTimeout of `urls`, the default lease extension."""
    values = []
    for url in urls:
        with contextlib.suppress(ClientError, BotoCoreError, ValueError, KeyError):
            attributes = (
                await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])
            )["Attributes"]
            values.append(int(attributes["VisibilityTimeout"]))
    return min(values) if values else None
