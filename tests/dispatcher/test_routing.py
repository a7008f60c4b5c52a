"""The scheduling shell and the pod view: model names, pod state shapes, membership."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from dispatcher.metrics import Metrics
from dispatcher.pods import PodClient, PodState
from dispatcher.routing import Router, model_key
from dispatcher.scheduler import FifoPolicy


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly"),
        ("v1-5-pruned-emaonly", "v1-5-pruned-emaonly"),
        ("v1-5-pruned-emaonly.safetensors [6ce0161689]", "v1-5-pruned-emaonly"),
        ("sd_xl_base_1.0.ckpt", "sd_xl_base_1.0"),
        (None, ""),
        ("", ""),
    ],
)
def test_model_key_matches_a1111_spellings(name, key):
    assert model_key(name) == key


def test_model_key_hash_suffix_is_anchored_at_the_very_end():
    from dispatcher.routing import _HASH_SUFFIX

    # `$` would match before the final newline and strip "[abcdef]" from a name that
    # does not end with it; model_key strips whitespace first, the pattern must not rely on it
    assert _HASH_SUFFIX.search("m [abcdef]\n") is None
    assert model_key("m.safetensors [abcdef]\n") == "m"
    assert model_key("m [abcdef]\nx") == "m [abcdef]\nx"


def test_pod_state_parses_runtime_shape():
    # The shape runtime/app.py answers (models per tier nested, busy as bool)
    doc = {
        "runtime": "sdruntime",
        "device": "cuda",
        "models": {"gpu": ["a"], "ram": ["a", "b"], "disk": ["a", "b", "c"], "loading": []},
        "default_model": "a",
        "busy": True,
        "slots": 2,
        "free_slots": 1,
        "running": [{"id": "t1", "progress": 0.5}],
    }
    state = PodState.parse(doc)
    assert state.gpu == {"a"} and state.ram == {"a", "b"} and state.disk == {"a", "b", "c"}
    assert (state.slots, state.free_slots, state.busy, state.default_model) == (2, 1, True, "a")
    assert state.available is None


@pytest.mark.parametrize(
    ("doc", "slots", "free"),
    [
        ({}, 1, 1),
        ({"gpu": [{"name": "a"}], "busy": 1, "slots": 1}, 1, 0),
        ({"busy": False, "free_slots": 3}, 3, 3),
        ({"models": {"error": "listing failed"}}, 1, 1),
        ("not a mapping", 1, 1),
    ],
)
def test_pod_state_tolerates_other_shapes(doc, slots, free):
    state = PodState.parse(doc)
    assert (state.slots, state.free_slots) == (slots, free)


def test_pod_state_reads_catalog_when_given():
    state = PodState.parse({"models": {"gpu": [], "available": ["x.safetensors", "y"]}})
    assert state.available == {"x.safetensors", "y"}


async def test_router_membership_keeps_running_pods_until_they_finish():
    async with aiohttp.ClientSession() as session:
        router = Router(
            FifoPolicy(),
            PodClient(session, job_timeout_s=5, state_timeout_s=1),
            metrics=Metrics(),
        )
        router.set_pods("rt", ["http://a:1/", "http://b:1"])
        assert set(router.pods["rt"]) == {"http://a:1", "http://b:1"}
        router.pods["rt"]["http://a:1"].inflight = 1
        # WHEN discovery no longer lists either
        router.set_pods("rt", [])
        # THEN the idle one is gone, the busy one stays (unlisted) until its job ends
        assert list(router.pods["rt"]) == ["http://a:1"]
        pod = router.pods["rt"]["http://a:1"]
        assert not pod.listed and not pod.schedulable
        router._release(pod)
        assert router.pods["rt"] == {}


def _backlog(metrics: Metrics, runtime: str) -> dict[str, float]:
    return {
        s.labels["model"]: s.value
        for m in metrics.registry.collect()
        if m.name == "sdeks_dispatcher_backlog"
        for s in m.samples
        if s.labels["runtime"] == runtime
    }


async def test_router_backlog_metric_bounds_untrusted_model_labels():
    import asyncio

    from dispatcher.routing import MAX_MODEL_LABELS, OTHER_LABEL

    async with aiohttp.ClientSession() as session:
        metrics = Metrics()
        router = Router(
            FifoPolicy(), PodClient(session, job_timeout_s=5, state_timeout_s=1), metrics=metrics
        )
        # GIVEN 300 waiting tasks, each naming a model of its own (a hostile publisher)
        waiters = [
            asyncio.create_task(router._acquire("rt", f"m-{i}", f"t{i}", 0.0, 0.0))
            for i in range(300)
        ]
        await asyncio.sleep(0)
        router.schedule()
        # THEN the backlog gauge keeps a bounded number of series, all tasks counted
        shown = _backlog(metrics, "rt")
        assert len(shown) <= MAX_MODEL_LABELS and OTHER_LABEL in shown
        assert sum(shown.values()) == 300
        # AND once they drained, their series are gone, not left at 0
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert _backlog(metrics, "rt") == {}


async def test_router_keeps_one_backlog_per_runtime_across_plans():
    import asyncio

    async with aiohttp.ClientSession() as session:
        router = Router(
            FifoPolicy(), PodClient(session, job_timeout_s=5, state_timeout_s=1), metrics=Metrics()
        )
        # GIVEN waiting tasks and no pod to take them
        waiters = [
            asyncio.create_task(router._acquire("rt", m, f"t{i}", float(i), 0.0))
            for i, m in enumerate(["a", "b", None, "a"])
        ]
        await asyncio.sleep(0)
        router.schedule()
        default, backlog = router._backlogs["rt"]
        assert len(backlog) == 4 and sorted(backlog.by_model) == ["", "a", "b"]
        # WHEN tasks come and go between plans
        waiters[0].cancel()
        await asyncio.gather(waiters[0], return_exceptions=True)
        late = asyncio.create_task(router._acquire("rt", "c", "late", 9.0, 0.0))
        await asyncio.sleep(0)
        router.schedule()
        # THEN the same backlog follows them (not one rebuilt per plan)
        assert router._backlogs["rt"][1] is backlog
        assert [t.key.split("#")[0] for t in backlog] == ["t1", "t2", "t3", "late"]
        for task in [*waiters[1:], late]:
            task.cancel()
        await asyncio.gather(*waiters[1:], late, return_exceptions=True)
        assert len(backlog) == 0


async def test_replicas_see_each_others_waiting_tasks_through_the_pods():
    from tests.dispatcher.conftest import FakePod

    pod = await FakePod(sns=None, topic_arn="", gpu=["a"], slots=0).start()
    old = await FakePod(sns=None, topic_arn="", gpu=["a"], slots=0, relays_demand=False).start()
    try:
        async with aiohttp.ClientSession() as session:
            client = PodClient(session, job_timeout_s=5, state_timeout_s=1)
            one = Router(FifoPolicy(), client, metrics=Metrics(), replica_id="one")
            two = Router(FifoPolicy(), client, metrics=Metrics(), replica_id="two")
            for router in (one, two):
                router.set_pods("rt", [pod.url, old.url])
            # GIVEN replica one holding 3 tasks of "x" and 1 of "y" (no pod is free)
            waiters = [
                asyncio.create_task(one._acquire("rt", m, f"t{i}", 0.0, 0.0))
                for i, m in enumerate(["x", "x", "x", "y.safetensors"])
            ]
            await asyncio.sleep(0)
            one.schedule()
            # WHEN both poll the pods
            await one.poll_states()
            await two.poll_states()
            # THEN replica two sees one's tasks per model (keys as the policy reads them)
            assert two.others_demand("rt") == {"x": 3, "y": 1}
            # AND one sees nothing of its own echoed back
            await one.poll_states()
            assert one.others_demand("rt") == {}
            # AND the older pod (no POST /v1/state) is polled with GET and relays nothing
            assert not one.pods["rt"][old.url].demand_supported
            assert one.pods["rt"][old.url].state is not None
            assert one.pods["rt"][pod.url].demand_supported
            # AND once one's tasks are gone its next report says so
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            await one.poll_states()
            await two.poll_states()
            assert two.others_demand("rt") == {}
            # AND with sharing off a replica neither reports nor reads
            three = Router(
                FifoPolicy(), client, metrics=Metrics(), replica_id="three", share_demand=False
            )
            three.set_pods("rt", [pod.url])
            await three.poll_states()
            assert three.others_demand("rt") == {}
            assert pod.demand.replicas() == 2
    finally:
        await pod.stop()
        await old.stop()


def test_pod_state_demand_from_a_hostile_pod_is_bounded():
    from sdeks.demand import MAX_COUNT, MAX_MODELS

    doc = {
        "demand": {
            "ok": 5,
            "neg": -1,
            "bool": True,
            "float": 2.5,
            "big": 10**12,
            "x" * 1000: 3,
            **{f"m{i}": 1 for i in range(2 * MAX_MODELS)},
        }
    }
    demand = PodState.parse(doc).demand
    assert demand is not None and demand["ok"] == 5 and demand["big"] == MAX_COUNT
    assert not {"neg", "bool", "float", "x" * 1000} & set(demand)
    assert len(demand) <= MAX_MODELS
    assert PodState.parse({"demand": ["a"]}).demand == {}
    assert PodState.parse({}).demand is None


async def test_router_backlog_metric_follows_tasks_without_walking_them():
    import asyncio
    from collections import Counter

    from dispatcher.pods import Pod

    async with aiohttp.ClientSession() as session:
        metrics = Metrics()
        router = Router(
            FifoPolicy(), PodClient(session, job_timeout_s=5, state_timeout_s=1), metrics=metrics
        )
        # GIVEN waiting tasks of three models and no free pod
        pod = Pod(
            url="http://p:1", runtime="rt", state=PodState(gpu=frozenset({"a"}), free_slots=0)
        )
        router.pods["rt"] = {pod.url: pod}
        models = ["a", "b", None, "a", "b", "a"]
        waiters = [
            asyncio.create_task(router._acquire("rt", m, f"t{i}", float(i), 0.0))
            for i, m in enumerate(models)
        ]
        await asyncio.sleep(0)
        router.schedule()
        assert _backlog(metrics, "rt") == {"a": 3, "b": 2, "default": 1}
        # WHEN one is cancelled and a pod frees up and takes the oldest
        waiters[1].cancel()
        await asyncio.gather(waiters[1], return_exceptions=True)
        pod.state = PodState(gpu=frozenset({"a"}), free_slots=1)
        router.schedule()
        assert await waiters[0] is pod
        # THEN the gauge and the kept counts are what is still waiting, per model
        still = Counter(w.model or "default" for w in router.waiting["rt"].values())
        assert _backlog(metrics, "rt") == {"a": 2, "b": 1, "default": 1} == dict(still)
        assert router._counts["rt"] == dict(still)
        # AND the gauge is updated from those counts, not by walking every waiting task
        router.waiting["rt"] = _NoWalk(router.waiting["rt"])
        late = asyncio.create_task(router._acquire("rt", "c", "late", 9.0, 0.0))
        await asyncio.sleep(0)
        router._update_backlog("rt")
        assert _backlog(metrics, "rt") == {"a": 2, "b": 1, "default": 1, "c": 1}
        # AND once every task is gone, so are their series
        for task in [*waiters, late]:
            task.cancel()
        await asyncio.gather(*waiters, late, return_exceptions=True)
        assert _backlog(metrics, "rt") == {} and router._counts["rt"] == {}


class _NoWalk(dict):
    """A waiting-task map that refuses to be iterated whole (lookups and updates only)."""

    def values(self):
        raise AssertionError("walked every waiting task")

    def __iter__(self):
        raise AssertionError("walked every waiting task")


def test_model_keys_of_pod_tiers_are_remembered_and_bounded():
    from dispatcher import routing

    names = frozenset({"a.safetensors", "b [abcdef12]"})
    first = routing._keys(names)
    assert first == {"a", "b"}
    # the same tier reported again (an equal set from a later poll) gives the same object
    assert routing._keys(frozenset(set(names))) is first
    # lists still work, uncached
    assert routing._keys(["c.ckpt"]) == {"c"}
    for i in range(routing._KEYS_SEEN_MAX + 10):
        routing._keys(frozenset({f"m{i}"}))
    assert len(routing._KEYS_SEEN) <= routing._KEYS_SEEN_MAX
