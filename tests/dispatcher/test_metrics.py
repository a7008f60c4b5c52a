"""Prometheus metrics after real traffic, and the /metrics endpoint."""

from __future__ import annotations

import socket

import aiohttp

from tests.dispatcher.conftest import envelope, publish, running, settings_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_count_outcomes_and_serve_endpoint(aws, stack, make_pod, callbacks):
    pod = await make_pod()
    port = free_port()
    settings = settings_for(
        stack, {"sdruntime": [pod.url]}, metrics_port=port, metrics_host="127.0.0.1"
    )
    async with running(settings) as metrics:
        publish(aws, stack, envelope("ok-1", model="m1"))
        publish(aws, stack, "{broken")
        await callbacks.wait_for(2)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
    assert 'sdeks_dispatcher_jobs_total{outcome="done",runtime="sdruntime"} 1.0' in text
    assert 'sdeks_dispatcher_failures_total{code="invalid_envelope"} 1.0' in text
    assert 'sdeks_dispatcher_model_switches_total{runtime="sdruntime"} 1.0' in text
    assert 'sdeks_dispatcher_dispatch_latency_seconds_count{runtime="sdruntime"} 1.0' in text
    assert 'sdeks_dispatcher_pods{runtime="sdruntime"} 1.0' in text
    for name in ("backlog", "leases_held"):
        assert f"sdeks_dispatcher_{name}" in text
    assert metrics.render()
