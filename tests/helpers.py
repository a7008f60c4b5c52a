"""Helpers the test packages share: an aiohttp app on a loopback port and a
strict read of a callback listener's queue.

The depth of an SQS queue is `benchmarks._common.queue_depth`, one definition
for the tests and the benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from sdeks.callback import Callback
from sdeks.client import CallbackListener


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) until the block ends; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def drain_callbacks(listener: CallbackListener) -> list[Callback]:
    """Every callback in the listener's queue now, deleted as read.

    Unlike `CallbackListener.poll`, which skips a malformed callback (the CLI
    must not stop on one), a malformed callback here fails the test.
    """
    assert listener.queue_url, "enter the listener first"
    out: list[Callback] = []
    while True:
        answer = listener.sqs.receive_message(
            QueueUrl=listener.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        )
        messages = answer.get("Messages", [])
        if not messages:
            return out
        out += [Callback.model_validate_json(m["Body"]) for m in messages]
        listener.sqs.delete_message_batch(
            QueueUrl=listener.queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )
