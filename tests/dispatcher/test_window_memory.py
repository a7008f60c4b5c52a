"""A task waiting in the window holds its parsed form only, not its message bodies."""

from __future__ import annotations

from typing import Any

from dispatcher.service import Dispatcher
from tests.dispatcher.conftest import envelope, publish, running, settings_for


async def test_dispatched_message_drops_its_body(aws, stack, make_pod, callbacks, monkeypatch):
    seen: list[tuple[dict[str, Any], bool]] = []
    process = Dispatcher._process

    async def recording(self, source, message, lease) -> None:
        seen.append((message, "Body" in message))
        await process(self, source, message, lease)

    monkeypatch.setattr(Dispatcher, "_process", recording)
    pod = await make_pod()
    async with running(settings_for(stack, {"sdruntime": [pod.url]})):
        publish(aws, stack, envelope("t-body", prompt="x" * 50_000))
        (got,) = await callbacks.wait_for(1)
    assert got["status"] == "succeeded"
    (job,) = pod.jobs
    assert len(job.task.content["prompt"]) == 50_000  # the pod got the whole task
    ((message, had_body),) = seen
    assert had_body and "Body" not in message
