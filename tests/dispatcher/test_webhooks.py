"""Webhook delivery from the `webhooks` queue: signed, guarded, recorded."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from sdeks.lifecycle import Reporter
from sdeks.tasks import TaskTable
from sdeks.webhooks import verify_signature
from tests.dispatcher.conftest import envelope, publish, running, settings_for
from tests.helpers import serve_app

SECRET = "s3cret-for-tests"


async def webhook_outcomes(table: TaskTable, ids: list[str], within: float = 20.0):
    """Each task's recorded webhook status, once all have one."""
    deadline = time.monotonic() + within
    while True:
        records = [await table.get(task_id) for task_id in ids]
        statuses = {r.id: r.webhook_status.value for r in records if r and r.webhook_status}
        if len(statuses) == len(ids) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.1)


async def test_webhooks_signed_delivery_and_private_address_refused(
    aws, stack, make_pod, callbacks
):
    # GIVEN a receiver on 127.0.0.1 (allow-listed) that verifies signatures
    received: list[tuple[bool, dict]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((verify_signature(SECRET, request.headers, body), json.loads(body)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    table = TaskTable(aws.dynamodb, stack.task_table)
    pod = await make_pod(reporter=Reporter(aws.sns, stack.callback_topic_arn, table=table))
    settings = settings_for(
        stack,
        {"sdruntime": [pod.url]},
        task_table=stack.task_table,
        webhook_queue_url=stack.webhook_queue_url,
        webhook_secret=SECRET,
        webhook_retries=0,
    )
    evil = envelope("evil-hook")
    evil["task"]["metadata"]["webhook"] = "http://169.254.169.254/latest/meta-data/"
    async with serve_app(app) as base, running(settings):
        good = envelope("hooked")
        good["task"]["metadata"]["webhook"] = f"{base}/hook"
        publish(aws, stack, good)
        publish(aws, stack, evil)
        await callbacks.wait_for(2)

        statuses = await webhook_outcomes(table, ["hooked", "evil-hook"])
    # THEN the receiver got one signed callback; the metadata address was refused unasked
    assert [(ok, doc["id"], doc["status"]) for ok, doc in received] == [
        (True, "hooked", "succeeded")
    ]
    assert statuses == {
        "hooked": "delivered",
        "evil-hook": "refused",
    }
