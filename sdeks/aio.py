"""asyncio helpers that stay cancellable.

`asyncio.wait_for` on Python 3.11 can swallow a cancellation that arrives in
the same turn of the loop as the awaited thing finishes (CPython gh-86296,
fixed in 3.12 by rebuilding `wait_for` on `asyncio.timeout`): it returns the
result instead of raising `CancelledError`. A service loop that waits in it
and is stopped by cancelling then runs on for good. `asyncio.timeout` counts
cancellations and does not lose one.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until `event` is set, at most `seconds` (None: no limit);
    whether it is set. A cancellation is never lost."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
