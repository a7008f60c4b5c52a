"""Pod discovery: static, and Kubernetes EndpointSlices (list + watch) against a
local HTTP server that answers like the API server does."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from dispatcher.discovery import KubernetesDiscovery, StaticDiscovery
from dispatcher.settings import DispatcherSettings

NAMESPACE = "sdeks"
PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


def endpoint_slice(
    name: str, endpoints: list[tuple[str, bool | None]], *, rv: str, port: int = 8080
) -> dict[str, Any]:
    """An EndpointSlice as the API server serializes it."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": "sdruntime-",
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "creationTimestamp": "2026-11-21T06:00:00Z",
            "labels": {
                "kubernetes.io/service-name": "sdruntime",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": "sdruntime",
                    "uid": "uid-svc",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {}
                if ready is None
                else {"ready": ready, "serving": ready, "terminating": not ready},
                "nodeName": "ip-10-0-1-1.ec2.internal",
                "targetRef": {
                    "kind": "Pod",
                    "namespace": NAMESPACE,
                    "name": f"pod-{address}",
                    "uid": f"uid-{address}",
                },
                "zone": "us-east-1a",
            }
            for address, ready in endpoints
        ],
        "ports": [
            {"name": "metrics", "port": 9100, "protocol": "TCP"},
            {"name": "http", "port": port, "protocol": "TCP"},
        ],
    }


class FakeApiServer:
    """Answers list and watch of EndpointSlices; tests push watch events."""

    def __init__(self) -> None:
        self.slices: dict[str, dict[str, Any]] = {}
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.requests: list[dict[str, str]] = []
        self.rv = 100
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append(query)
        assert query.get("labelSelector") == "kubernetes.io/service-name=sdruntime"
        if query.get("watch", "").lower() != "true":
            return web.json_response(
                {
                    "kind": "EndpointSliceList",
                    "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"resourceVersion": str(self.rv)},
                    "items": list(self.slices.values()),
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        while True:
            event = await self.events.get()
            if event is None:  # end this watch (the client relists or re-watches)
                break
            await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
        return response

    def push(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.put_nowait({"type": kind, "object": obj})


@pytest.fixture
async def api_server() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    app = web.Application()
    app.router.add_get(PATH, server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    for _ in range(4):
        server.events.put_nowait(None)
    await runner.cleanup()


async def next_change(changes: asyncio.Queue, expected: set[str]) -> None:
    while True:
        runtime, urls = await asyncio.wait_for(changes.get(), 10)
        assert runtime == "sdruntime"
        if urls == expected:
            return


async def test_discovery_static_reports_configured_pods():
    seen: list[tuple[str, set[str]]] = []
    await StaticDiscovery({"a": ["http://x:1", "http://y:2"]}).run(lambda r, u: seen.append((r, u)))
    assert seen == [("a", {"http://x:1", "http://y:2"})]


async def test_discovery_kubernetes_lists_then_follows_watch(api_server):
    # GIVEN one slice with a ready and a not-ready endpoint
    first = endpoint_slice("sdruntime-abc", [("10.0.1.5", True), ("10.0.1.6", False)], rv="90")
    api_server.slices[first["metadata"]["name"]] = first
    settings = DispatcherSettings(
        callback_topic_arn="arn:aws:sns:us-east-1:123456789012:cb",
        output_bucket="out",
        queues={"sdruntime": "http://q"},
        discovery="kubernetes",
        kubernetes_namespace=NAMESPACE,
        kubernetes_api_url=api_server.url,
    )
    discovery = KubernetesDiscovery.from_settings(settings)
    discovery.retry_s = 0.1
    changes: asyncio.Queue = asyncio.Queue()
    running = asyncio.create_task(discovery.run(lambda r, u: changes.put_nowait((r, u))))
    try:
        # THEN only the ready endpoint, on the "http" port
        await next_change(changes, {"http://10.0.1.5:8080"})
        # WHEN the second pod becomes ready, and a second slice appears
        ready = endpoint_slice("sdruntime-abc", [("10.0.1.5", True), ("10.0.1.6", True)], rv="")
        api_server.push("MODIFIED", ready)
        await next_change(changes, {"http://10.0.1.5:8080", "http://10.0.1.6:8080"})
        other = endpoint_slice("sdruntime-def", [("10.0.2.7", None)], rv="")
        api_server.push("ADDED", other)
        await next_change(
            changes, {"http://10.0.1.5:8080", "http://10.0.1.6:8080", "http://10.0.2.7:8080"}
        )
        # WHEN a pod starts terminating, and the first slice goes away
        draining = endpoint_slice("sdruntime-def", [("10.0.2.7", False)], rv="")
        api_server.push("MODIFIED", draining)
        await next_change(changes, {"http://10.0.1.5:8080", "http://10.0.1.6:8080"})
        api_server.push("DELETED", ready)
        await next_change(changes, set())
        # WHEN the watch ends (the API server's timeout), the client relists
        api_server.slices = {
            "sdruntime-xyz": endpoint_slice("sdruntime-xyz", [("10.0.3.1", True)], rv="200")
        }
        api_server.events.put_nowait(None)
        await next_change(changes, {"http://10.0.3.1:8080"})
        watches = [r for r in api_server.requests if r.get("watch", "").lower() == "true"]
        assert watches and all(w.get("resourceVersion") for w in watches)
    finally:
        running.cancel()
        api_server.events.put_nowait(None)
        with pytest.raises(asyncio.CancelledError):
            await running
