"""sdeks.aio: a wait that never loses a cancellation (CPython gh-86296 on 3.11)."""

from __future__ import annotations

import asyncio

from sdeks.aio import wait_event


async def _cancel_as_the_event_is_set(wait) -> asyncio.Task[None]:
    """A service loop that waits on an event, cancelled in the very turn of the
    loop in which its wait finishes: the race `asyncio.wait_for` loses on 3.11."""
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while rounds < 1000:
            rounds += 1
            event.clear()
            await wait(event)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop is waiting
    event.set()
    await asyncio.sleep(0)  # the inner wait finishes; the outer one is not woken yet
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    return task


async def test_a_cancel_that_meets_the_event_stops_the_loop():
    task = await _cancel_as_the_event_is_set(lambda event: wait_event(event, 1.0))
    assert task.cancelled()


async def test_wait_event_says_whether_the_event_was_set():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True
    assert await wait_event(event, None) is True
