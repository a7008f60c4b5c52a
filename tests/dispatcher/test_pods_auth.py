"""The dispatcher sends the pod API token on every call, and a refused token is the pod's
fault (retry elsewhere), never the task's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from dispatcher.errors import PodFailedError
from dispatcher.pods import PodClient
from sdeks.envelope import Task, TaskType
from sdeks.job import Job

TOKEN = "dispatcher-test-token"


@pytest.fixture
async def guarded_pod() -> AsyncIterator[tuple[str, list[str | None]]]:
    """A pod double that answers 401 unless `Authorization: Bearer TOKEN`; records headers."""
    seen: list[str | None] = []

    async def handle(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization")
        seen.append(given)
        if given != f"Bearer {TOKEN}":
            return web.json_response(
                {"error": {"code": "unauthorized", "message": "no"}}, status=401
            )
        if request.path == "/v1/state":
            return web.json_response({"models": {"gpu": ["m"]}, "slots": 1, "free_slots": 1})
        if request.path == "/v1/prefetch":
            return web.json_response({"ok": True})
        return web.json_response({"id": "t-1", "status": "succeeded", "result": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


def _job() -> Job:
    task = Task(
        id="t-1", runtime="sdruntime", tasktype=TaskType.TEXT_TO_IMAGE, prefix="p", content={}
    )
    return Job(task=task, model="m")


async def test_pod_client_sends_the_token_on_every_call(guarded_pod) -> None:
    url, seen = guarded_pod
    async with aiohttp.ClientSession() as session:
        client = PodClient(session, job_timeout_s=5, state_timeout_s=5, token=TOKEN)
        assert (await client.state(url)).gpu == frozenset({"m"})
        assert (await client.submit(url, _job())).status == "succeeded"
        assert await client.prefetch(url, "m") is True
    assert seen == [f"Bearer {TOKEN}"] * 3


async def test_a_refused_token_fails_the_pod_not_the_task(guarded_pod) -> None:
    url, _ = guarded_pod
    async with aiohttp.ClientSession() as session:
        client = PodClient(session, job_timeout_s=5, state_timeout_s=5, token="stale-token")
        # PodFailedError: the job is rescheduled on another pod (a PodRejectedError would
        # fail the task with the pod's error code).
        with pytest.raises(PodFailedError, match="SDEKS_POD_TOKEN differs"):
            await client.submit(url, _job())
        with pytest.raises(PodFailedError, match="HTTP 401"):
            await client.state(url)
