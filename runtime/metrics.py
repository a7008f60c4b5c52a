"""Prometheus metrics of a pod (`GET /metrics`).

One registry per app, so several apps in one test process never collide in
prometheus-client's global registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PodMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, runtime: str, slots: int) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "sdeks_runtime_jobs",
            "Jobs finished, by API, task type and status",
            ["api", "tasktype", "status"],
            registry=self.registry,
        )
        self.images = Counter(
            "sdeks_runtime_images", "Images rendered", ["tasktype"], registry=self.registry
        )
        self.rejected = Counter(
            "sdeks_runtime_rejected_busy",
            "Jobs answered 429 (no free slot)",
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "sdeks_runtime_phase_seconds",
            "Seconds per job phase",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=self.registry,
        )
        self.busy = Gauge("sdeks_runtime_busy_slots", "Slots in use", registry=self.registry)
        self.slots = Gauge("sdeks_runtime_slots", "Slots", registry=self.registry)
        self.slots.set(slots)
        self.info = Gauge(
            "sdeks_runtime_info", "Constant 1, labelled", ["runtime"], registry=self.registry
        )
        self.info.labels(runtime=runtime).set(1)

    def observe_timings(self, timings: dict[str, int]) -> None:
        for phase in ("queued", "download", "model_load", "inference", "upload", "total"):
            value = timings.get(f"{phase}_ms")
            if value is not None:
                self.phase_seconds.labels(phase=phase).observe(value / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
