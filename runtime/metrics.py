"""Prometheus metrics of a pod (`GET /metrics`).

One registry per app, so several apps in one test process never collide in
prometheus-client's global registry.
"""

from __future__ import annotations

import functools
import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Renders the `..._recent` quantiles are computed over.
RECENT_RENDERS = 256
RECENT_QUANTILES = (0.5, 0.95)
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
        self.reserved = Counter(
            "sdeks_runtime_rejected_reserved",
            "Jobs answered 429 `reserved`: first call for another dispatcher replica",
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "sdeks_runtime_phase_seconds",
            "Seconds per job phase",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=self.registry,
        )
        # Quantiles of the last renders, computed here: CloudWatch gets a Prometheus
        # histogram as min/max/sum/count only (no percentiles), so the dashboard's
        # p50/p95 come from these; Prometheus users have the histogram above.
        self._recent: deque[float] = deque(maxlen=RECENT_RENDERS)
        self._recent_lock = threading.Lock()  # renders end in worker threads
        self.recent = Gauge(
            "sdeks_runtime_render_seconds_recent",
            f"Inference seconds of the last {RECENT_RENDERS} renders, by quantile",
            ["quantile"],
            registry=self.registry,
        )
        for q in RECENT_QUANTILES:
            self.recent.labels(quantile=str(q)).set_function(
                functools.partial(self.recent_quantile, q)
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
        inference = timings.get("inference_ms")
        if inference:
            with self._recent_lock:
                self._recent.append(inference / 1000)

    def recent_quantile(self, q: float) -> float:
        """Nearest-rank quantile of the recent renders; 0 before the first."""
        with self._recent_lock:
            ordered = sorted(self._recent)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def render(self) -> bytes:
        return generate_latest(self.registry)
