"""Dispatcher configuration: one frozen object read once from `SDEKS_*` variables.

Complex fields are JSON (pydantic-settings parses them), e.g.
``SDEKS_QUEUES='{"sdruntime": "https://sqs.../sdeks-sdruntime-tasks"}'``.
docs/dispatcher.md lists every variable; keep the names stable, the local
stack and the Kubernetes Deployment both set them.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from sdeks.names import MAX_RECEIVE_COUNT, check_runtime_name
from sdeks.settings import ServiceSettings

MiB = 1024 * 1024


class DispatcherSettings(ServiceSettings):
    # --- queues -----------------------------------------------------------
    #: runtime name -> task queue URL (one queue per runtime).
    queues: dict[str, str]
    #: The catch-all queue (tasks published without a known `runtime` attribute).
    catch_all_queue_url: str | None = None
    #: Messages held (leased) per queue at once: the scheduler's view of the backlog.
    #: None: it grows with the fleet, `window_per_pod` per pod of the queue's runtime,
    #: at least `window_min`, at most `window_max` (docs/dispatcher.md, "Scheduling").
    window: int | None = Field(default=None, ge=1, le=100_000)
    window_per_pod: int = Field(default=128, ge=1)
    window_min: int = Field(default=1024, ge=1)
    #: SQS allows 120 000 messages in flight per queue, for all replicas together.
    window_max: int = Field(default=20_000, ge=1, le=100_000)
    #: Long-poll wait of ReceiveMessage (SQS allows 0-20); stopping waits for one poll to end.
    receive_wait_s: int = Field(default=10, ge=0, le=20)
    #: Seconds each heartbeat extends a held message by; None: the queue's VisibilityTimeout.
    lease_extension_s: int | None = Field(default=None, ge=1, le=43200)
    #: Seconds between heartbeats; None: a third of the extension.
    heartbeat_interval_s: float | None = Field(default=None, gt=0)
    #: Used when a queue has no RedrivePolicy to read maxReceiveCount from.
    max_receive_count: int = Field(default=MAX_RECEIVE_COUNT, ge=1)
    #: On SIGTERM: seconds to let running jobs finish before releasing them.
    grace_period_s: float = Field(default=60.0, ge=0)

    # --- pods -------------------------------------------------------------
    discovery: Literal["static", "kubernetes"] = "static"
    #: Static discovery: runtime -> pod base URLs.
    pods: dict[str, list[str]] = Field(default_factory=dict)
    kubernetes_namespace: str = "default"
    #: runtime -> headless Service name; a runtime missing here uses its own name.
    kubernetes_services: dict[str, str] = Field(default_factory=dict)
    #: EndpointSlice port name to use; the first port when absent.
    kubernetes_port_name: str = "http"
    #: API server URL; None: in-cluster config (service account), else ~/.kube/config.
    kubernetes_api_url: str | None = None
    #: Seconds between `/v1/state` polls of each pod.
    state_interval_s: float = Field(default=2.0, gt=0)
    #: Report this replica's waiting tasks per model on each poll (`POST /v1/state`)
    #: and plan with the other replicas' reports that the pods relay back.
    share_demand: bool = True
    #: Timeout of a state poll or prefetch hint.
    state_timeout_s: float = Field(default=5.0, gt=0)
    #: Consecutive failed polls after which a pod is dropped and its tasks rescheduled.
    pod_failure_threshold: int = Field(default=3, ge=1)
    #: Total time one `POST /v1/jobs` may take (rendering can take minutes).
    job_timeout_s: float = Field(default=1800.0, gt=0)
    #: Attempts on different pods within one receive before the message is released.
    pod_attempts: int = Field(default=3, ge=1)
    #: A released message reappears after this many seconds, doubled per receive (max 300).
    retry_backoff_s: float = Field(default=2.0, ge=0)

    # --- scheduling -------------------------------------------------------
    #: "affinity" (model affinity, the default) or "fifo" (the reference policy).
    policy: Literal["affinity", "fifo"] = "affinity"
    #: A task waiting longer than this (since publish) is served next, switching a pod if needed.
    max_wait_s: float = Field(default=300.0, gt=0)
    #: Estimated seconds of one job, to weigh backlog against switch costs.
    inference_estimate_s: float = Field(default=5.0, gt=0)
    #: Estimated seconds to make a model active from each tier (and from the bucket).
    load_ram_s: float = Field(default=3.0, ge=0)
    load_disk_s: float = Field(default=15.0, ge=0)
    load_remote_s: float = Field(default=30.0, ge=0)

    # --- links ------------------------------------------------------------
    #: CIDRs allowed although private/loopback (the local stack: ["127.0.0.1/32"]).
    link_allow_nets: list[str] = Field(default_factory=list)
    #: Buckets `s3://` links may read; empty: no s3:// link is allowed.
    s3_allow_buckets: list[str] = Field(default_factory=list)
    link_max_bytes: int = Field(default=20 * MiB, ge=1)
    #: Total time for one link, DNS, redirects and body included.
    link_timeout_s: float = Field(default=30.0, gt=0)
    link_max_redirects: int = Field(default=5, ge=0)
    #: Decoded width x height limit; larger images are refused as bombs.
    link_max_pixels: int = Field(default=32 * MiB, ge=1)
    #: Links per task, counted per occurrence (one link written 300 times counts 300).
    link_max_per_task: int = Field(default=16, ge=1)
    #: Resolved image bytes per task, each occurrence counted (its base64 is sent once each).
    link_max_task_bytes: int = Field(default=64 * MiB, ge=1)
    #: Memory budget of one dispatcher for tasks whose links are resolved and held at once:
    #: a task reserves 4 x its worst case (the image, its base64 in the job, the job's JSON
    #: body) before downloading and keeps it until its pod answers; tasks wait for room.
    link_memory_budget_bytes: int = Field(default=1024 * MiB, ge=1)
    #: Downloads in flight at once across all tasks.
    link_concurrency: int = Field(default=16, ge=1)
    #: Tasks with links whose images may be downloaded and held ahead of a pod at once.
    link_ahead: int = Field(default=32, ge=1)

    # --- task table (docs/lifecycle.md; on when SDEKS_TASK_TABLE is set) ---
    #: Idempotency window: a finished id is not rendered again within it.
    task_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    #: A terminal callback claimed but not confirmed for this long is republished.
    callback_republish_after_s: float = Field(default=120.0, gt=0)

    # --- webhooks (docs/lifecycle.md) --------------------------------------
    #: The `webhooks` queue (subscribed to the callback topic); None: no delivery here.
    webhook_queue_url: str | None = None
    #: HMAC secret shared with receivers; required with `webhook_queue_url`.
    webhook_secret: SecretStr | None = None
    webhook_retries: int = Field(default=4, ge=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_concurrency: int = Field(default=16, ge=1)

    # --- observability ----------------------------------------------------
    #: Port of the Prometheus `/metrics` endpoint; 0 disables it.
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"

    @field_validator("queues", "pods", "kubernetes_services")
    @classmethod
    def _runtime_keys(cls, value: dict) -> dict:
        for runtime in value:
            check_runtime_name(runtime)
        return value

    @field_validator("link_allow_nets")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"link_allow_nets: {net!r} is not a CIDR") from exc
        return value

    @model_validator(mode="after")
    def _discovery_complete(self) -> DispatcherSettings:
        if not self.queues:
            raise ValueError("queues: at least one runtime queue is required")
        if self.webhook_queue_url and not (self.webhook_secret and self.task_table):
            raise ValueError(
                "webhook_queue_url needs webhook_secret and task_table (the URL is read there)"
            )
        if self.discovery == "static":
            missing = sorted(set(self.queues) - set(self.pods))
            if missing:
                raise ValueError(f"pods: static discovery needs pod URLs for {missing}")
        return self

    def window_for(self, pods: int) -> int:
        """Messages held per queue when its runtime has `pods` pods."""
        if self.window is not None:
            return self.window
        return max(self.window_min, min(self.window_max, self.window_per_pod * pods))

    def service_name(self, runtime: str) -> str:
        return self.kubernetes_services.get(runtime, runtime)
