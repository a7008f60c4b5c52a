"""Prometheus metrics of the dispatcher, on a registry of their own (one per
`Metrics`, so tests can run several dispatchers in one process), served at
`/metrics` by a small aiohttp app (the one HTTP library)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.backlog = Gauge(
            "sdeks_dispatcher_backlog",
            "Tasks held and waiting for a pod, per runtime and model",
            ["runtime", "model"],
            registry=r,
        )
        self.leases = Gauge(
            "sdeks_dispatcher_leases_held",
            "SQS messages held (leased) now",
            ["runtime"],
            registry=r,
        )
        self.lost_leases = Counter(
            "sdeks_dispatcher_leases_lost_total",
            "Leases whose receipt handle SQS stopped accepting",
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "sdeks_dispatcher_dispatch_latency_seconds",
            "Seconds from receiving a task to handing it to a pod",
            ["runtime"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.job_seconds = Histogram(
            "sdeks_dispatcher_job_seconds",
            "Seconds a pod took to answer a job",
            ["runtime"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.switches = Counter(
            "sdeks_dispatcher_model_switches_total",
            "Jobs sent to a pod whose active model differed",
            ["runtime"],
            registry=r,
        )
        self.prefetches = Counter(
            "sdeks_dispatcher_prefetch_hints_total", "Prefetch hints sent", ["runtime"], registry=r
        )
        self.failures = Counter(
            "sdeks_dispatcher_failures_total",
            "Failed callbacks published by the dispatcher, by error code",
            ["code"],
            registry=r,
        )
        self.completed = Counter(
            "sdeks_dispatcher_jobs_total",
            "Messages finished, by outcome (done, failed, forwarded, released)",
            ["runtime", "outcome"],
            registry=r,
        )
        self.pod_retries = Counter(
            "sdeks_dispatcher_pod_retries_total",
            "Jobs retried on another pod after a pod failure",
            ["runtime"],
            registry=r,
        )
        self.reserved = Counter(
            "sdeks_dispatcher_pod_reserved_total",
            "Jobs a pod sent back (429 `reserved`): first call for another replica",
            ["runtime"],
            registry=r,
        )
        self.errors = Counter(
            "sdeks_dispatcher_errors_total",
            "Unexpected errors the dispatcher survived, by where (message, planning)",
            ["where"],
            registry=r,
        )
        self.pods = Gauge(
            "sdeks_dispatcher_pods", "Pods that can take work, per runtime", ["runtime"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def start_metrics_server(metrics: Metrics, *, host: str, port: int) -> web.AppRunner:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
