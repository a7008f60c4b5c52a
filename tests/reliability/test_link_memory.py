"""Issue 14, class 7: repeated links count per occurrence, a task's resolved images are
capped, and many large-link tasks arriving at once stay within the dispatcher's memory
budget for links (`SDEKS_LINK_MEMORY_BUDGET_BYTES`) instead of all resolving together.

The links are real HTTP downloads from an image server on 127.0.0.1 (allow-listed,
as the local stack does), through the real dispatcher on moto; the pod is a double.
Memory is Python's allocation peak (tracemalloc) while the tasks are handled.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tracemalloc
import uuid

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from tests.reliability.harness import RUNTIME, Delivery, Harness, plain_task

MiB = 1024 * 1024
TASKS = 8


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


@pytest.fixture
async def image_server():
    png = _noise_png(600)  # ~1 MiB, incompressible

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=png, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", len(png)
    await runner.cleanup()


async def _harness(aws, stack, **settings) -> Harness:
    harness = Harness(aws, stack)
    await harness.start(
        link_allow_nets=["127.0.0.1/32"], link_max_bytes=3 * MiB // 2, link_timeout_s=60, **settings
    )
    return harness


def _link_task(base: str, task_id: str, links: list[str]) -> Delivery:
    body = plain_task(task_id, prefix="mem")
    body["task"]["metadata"]["tasktype"] = "image-to-image"
    body["task"]["content"]["init_images"] = [f"{base}/{name}.png" for name in links]
    return Delivery(json.dumps(body), "sns", attribute=RUNTIME)


async def test_repeated_link_counts_per_occurrence(aws, stack, image_server):
    base, _ = image_server
    harness = await _harness(aws, stack)
    try:
        task_id = f"mem-rep-{uuid.uuid4().hex[:8]}"
        assert harness.deliver([_link_task(base, task_id, ["same"] * 300)]) == 1
        await harness.handle_all()
        ((cid, code),) = [(c.id, c.error.code if c.error else None) for c in harness.callbacks()]
        assert (cid, code) == (task_id, "link_forbidden")
        assert harness.pod.jobs == []
        # within the count, the per-task byte cap counts each occurrence too
        capped = f"mem-cap-{uuid.uuid4().hex[:8]}"
        links = harness.dispatcher.links
        links.policy = dataclasses.replace(links.policy, max_task_bytes=5 * MiB)
        assert harness.deliver([_link_task(base, capped, ["one"] * 10)]) == 1
        await harness.handle_all()
        assert [(c.id, c.error.code) for c in harness.callbacks()] == [(capped, "link_too_large")]
    finally:
        await harness.close()


async def _peak_while_handling(harness: Harness, base: str, tasks: int) -> int:
    harness.pod.delay_s = 0.3  # a busy pod: resolved tasks wait for it, holding their images
    deliveries = [
        _link_task(base, f"mem-{uuid.uuid4().hex[:8]}", [f"{n}-a", f"{n}-b"]) for n in range(tasks)
    ]
    assert sum(harness.deliver(deliveries[i : i + 10]) for i in range(0, tasks, 10)) == tasks
    tracemalloc.start()
    try:
        await harness.handle_all()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    callbacks = harness.callbacks()
    assert sorted(c.status.value for c in callbacks) == ["succeeded"] * tasks
    return peak


async def test_many_large_link_tasks_stay_within_the_memory_budget(aws, stack, image_server):
    base, size = image_server
    # Each task: 2 links of ~1 MiB; the caps make its reservation 4 x 3 MiB = 12 MiB,
    # so two tasks fit the budget at once while all of them arrive together.
    budget = 24 * MiB
    harness = await _harness(aws, stack, link_memory_budget_bytes=budget)
    try:
        peak = await _peak_while_handling(harness, base, tasks=TASKS)
    finally:
        await harness.close()
    print(
        f"link memory: peak {peak / MiB:.0f} MiB (Python allocations, moto and the pod double "
        f"included) with a {budget // MiB} MiB budget; {TASKS} tasks of "
        f"{2 * size / MiB:.1f} MiB of images"
    )
    assert harness.dispatcher.links.budget.peak <= budget
    # Measured 64 MiB for 16 tasks on the development machine: bounded by the budget,
    # not by the number of tasks (all of them resolving at once would hold more).
    assert peak <= budget + 72 * MiB
