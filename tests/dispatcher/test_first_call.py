"""First call (`sdeks.grace`): a pod held for the replica whose job just ended.

Pod doubles on 127.0.0.1 (tests/dispatcher/conftest.py) report the hold in
their state or answer 429 `reserved`; the router reads both over HTTP.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from dispatcher.metrics import Metrics
from dispatcher.pods import PodClient, PodState
from dispatcher.routing import Router
from dispatcher.scheduler import FifoPolicy
from sdeks.callback import Callback, TaskStatus
from sdeks.envelope import Task, TaskType
from sdeks.grace import MAX_GRACE_S, Reserved
from sdeks.job import Job
from tests.dispatcher.conftest import FakePod


def _job(task_id: str, model: str) -> Job:
    task = Task(id=task_id, runtime="rt", tasktype=TaskType.TEXT_TO_IMAGE, prefix="p", content={})
    return Job(task=task, model=model)


async def _answer(job: Job) -> web.Response:
    callback = Callback(
        id=job.task.id,
        runtime=job.task.runtime,
        tasktype=job.task.tasktype.value,
        status=TaskStatus.SUCCEEDED,
        result=True,
    )
    return web.json_response(json.loads(callback.model_dump_json()))


def _held(replica: str = "other", model: str = "a.safetensors", for_s: float = 2.0) -> dict:
    return {"reserved": {"replica": replica, "model": model, "for_s": for_s}}


def test_pod_state_reads_a_hold_and_distrusts_a_hostile_one():
    state = PodState.parse(_held(for_s=1.5))
    assert state.reserved == Reserved("other", "a.safetensors", 1.5) and state.first_call
    # a runtime that knows first call but holds nothing
    idle = PodState.parse({"reserved": None})
    assert idle.reserved is None and idle.first_call
    # an older runtime: no key, so jobs must not name a replica (it forbids unknown fields)
    assert not PodState.parse({}).first_call
    assert PodState.parse(_held(for_s=3600)).reserved.for_s == MAX_GRACE_S  # type: ignore[union-attr]
    for bad in (
        _held(replica="a/../b"),
        _held(replica=""),
        _held(replica="x" * 65),
        _held(for_s=-1),
        _held(for_s=True),
        _held(model="m" * 300),
        {"reserved": ["other"]},
        {"reserved": {"replica": "other", "model": 3, "for_s": 1}},
    ):
        assert PodState.parse(bad).reserved is None, bad


async def test_a_pod_held_for_another_replica_takes_only_tasks_of_its_model():
    now = [100.0]
    pod = await FakePod(sns=None, topic_arn="", gpu=["a"], extra_state=_held(for_s=2.0)).start()
    try:
        async with aiohttp.ClientSession() as session:
            client = PodClient(session, job_timeout_s=5, state_timeout_s=1)
            router = Router(
                FifoPolicy(), client, metrics=Metrics(), replica_id="me", clock=lambda: now[0]
            )
            router.set_pods("rt", [pod.url])
            await router.poll_states()
            assert router.pods["rt"][pod.url].held == ("other", "a", 102.0)
            # GIVEN this replica's task of another model: it would switch the held pod
            other = asyncio.create_task(router._acquire("rt", "b", "t-b", 0.0, 0.0))
            await asyncio.sleep(0)
            # THEN the plan leaves the pod to its holder, and asks to be woken when it ends
            assert router.schedule() == 102.0
            assert not other.done()
            # WHEN a task of the pod's own model comes (no switch): it takes the pod
            same = asyncio.create_task(router._acquire("rt", "a [0123abcd]", "t-a", 1.0, 0.0))
            await asyncio.sleep(0)
            # (FIFO gives the pod to the older task of "b": refused here, it keeps waiting)
            router.schedule()
            await asyncio.sleep(0)
            assert not other.done() and not same.done()
            same.cancel()
            same = asyncio.create_task(router._acquire("rt", "a [0123abcd]", "t-a", -1.0, 0.0))
            await asyncio.sleep(0)
            router.schedule()
            await asyncio.sleep(0)
            assert same.done() and (await same).url == pod.url and not other.done()
            router._release(await same)
            # WHEN the hold ends: the other task takes the pod
            now[0] = 102.5
            router.schedule()
            await asyncio.sleep(0)
            assert other.done() and (await other).url == pod.url
            # AND a hold the pod grants this replica itself keeps nothing out
            pod.extra_state = _held(replica="me")
            await router.poll_states()
            assert router.pods["rt"][pod.url].held is None
    finally:
        await pod.stop()
