"""`POST /v1/state`: the pod relays dispatcher replicas' waiting work to one another.

A real runtime app served by uvicorn on 127.0.0.1, asked over HTTP by raw
clients and by the dispatcher's own `PodClient`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from runtime.settings import RuntimeSettings
from sdeks.demand import MAX_COUNT, MAX_MODELS, MAX_NAME, DemandBoard, DemandReport


@pytest.fixture
def pod_url(tiny_models_dir: Path, tmp_path: Path) -> Iterator[str]:
    import uvicorn

    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path)
    app = create_app(RuntimeSettings(default_model="tiny-sd15"), models=store)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _report(replica: str, demand: dict, other: int = 0, ttl_s: float = 10) -> dict:
    return {"replica": replica, "demand": demand, "other": other, "ttl_s": ttl_s}


def test_state_relays_the_other_replicas_demand(pod_url: str):
    with httpx.Client(base_url=pod_url) as http:
        first = http.post("/v1/state", json=_report("a", {"m1": 3, "m2": 1}, other=2))
        assert first.status_code == 200
        # the state as a GET gives it, with no other replica reported yet
        assert first.json()["runtime"] == "sdruntime" and first.json()["demand"] == {}
        second = http.post("/v1/state", json=_report("b", {"m1": 4, "": 5})).json()
        # THEN each replica reads the sum of the others', never its own
        assert second["demand"] == {"m1": 3, "m2": 1} and second["demand_other"] == 2
        again = http.post("/v1/state", json=_report("a", {"m1": 1})).json()
        assert again["demand"] == {"m1": 4, "": 5}
        # AND a GET (operators) sums every replica's last report
        everyone = http.get("/v1/state").json()
        assert everyone["demand"] == {"m1": 5, "": 5} and everyone["free_slots"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_report("a", {"m": -1}), "demand.m"),
        (_report("a", {"m": True}), "demand.m"),
        (_report("a", {"m": 1.5}), "demand.m"),
        (_report("a", {"x" * (MAX_NAME + 1): 1}), "demand"),
        (_report("a", {f"m{i}": 1 for i in range(MAX_MODELS + 1)}), "demand"),
        (_report("a", ["m"]), "demand"),
        (_report("a/../b", {}), "replica"),
        (_report("", {}), "replica"),
        ({"demand": {}}, "replica"),
        (_report("a", {}, other=-3), "other"),
        (_report("a", {}, ttl_s=0), "ttl_s"),
        (_report("a", {}, ttl_s=10_000), "ttl_s"),
        ([1, 2], "body"),
    ],
)
def test_state_refuses_a_bad_report_naming_the_field(pod_url: str, body, field: str):
    with httpx.Client(base_url=pod_url) as http:
        response = http.post("/v1/state", json=body)
        assert response.status_code == 400
        error = response.json()
        assert error["code"] == "invalid_parameter" and error["message"].startswith(field)
        # nothing of it was kept
        assert http.get("/v1/state").json()["demand"] == {}


def test_state_refuses_a_body_too_large_or_not_json(pod_url: str):
    with httpx.Client(base_url=pod_url) as http:
        huge = http.post("/v1/state", content=b"{" + b" " * 200_000 + b"}")
        assert huge.status_code == 400 and huge.json()["message"].startswith("body")
        garbage = http.post("/v1/state", content=b"not json")
        assert garbage.status_code == 400 and garbage.json()["message"].startswith("body")


async def test_dispatcher_client_reports_and_reads_back(pod_url: str):
    from dispatcher.pods import PodClient

    async with aiohttp.ClientSession() as session:
        client = PodClient(session, job_timeout_s=5, state_timeout_s=5)
        await client.state(pod_url, DemandReport.of("one", {"a": 7, "b": 2}, ttl_s=10))
        state = await client.state(pod_url, DemandReport.of("two", {"a": 1}, ttl_s=10))
        assert state.demand == {"a": 7, "b": 2} and state.slots == 1
        # a plain GET poll has no others' view (its sum would count this replica too)
        assert (await client.state(pod_url)).demand is None


def test_demand_board_expires_reports_and_stays_bounded():
    now = [0.0]
    board = DemandBoard(clock=lambda: now[0])
    board.report(DemandReport("a", {"m": 2}, ttl_s=6))
    board.report(DemandReport("b", {"m": MAX_COUNT}, ttl_s=60))
    assert board.others("c") == ({"m": MAX_COUNT}, 0)  # capped, not summed past
    now[0] = 7.0  # a's report expired: a replica that died stops counting
    assert board.others("b") == ({}, 0) and board.replicas() == 1
    for i in range(100):
        board.report(DemandReport(f"r{i}", {"m": 1}))
    assert board.replicas() <= 64
    # a report names the largest counts and sums the rest into `other`
    report = DemandReport.of("x", {f"m{i}": i + 1 for i in range(MAX_MODELS + 10)}, ttl_s=5)
    assert len(report.demand) == MAX_MODELS and report.other == sum(range(1, 11))
