"""Wiring: build the clients, inject them, run the dispatcher until `stop` is set.

The one place that creates the dispatcher's AWS clients (through
`sdeks.aws.aio_client`), its HTTP sessions and its pod discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from dispatcher.discovery import KubernetesDiscovery, StaticDiscovery
from dispatcher.leases import LeaseKeeper
from dispatcher.links import LinkPolicy, LinkResolver, Resolver, system_resolver
from dispatcher.metrics import Metrics, start_metrics_server
from dispatcher.pods import PodClient
from dispatcher.queues import queue_sources, queue_visibility
from dispatcher.routing import Router
from dispatcher.scheduler import AffinityPolicy, CostModel, FifoPolicy, Policy
from dispatcher.service import Dispatcher
from dispatcher.settings import DispatcherSettings
from dispatcher.webhooks import WebhookConsumer
from sdeks.aws import aio_client
from sdeks.lifecycle import Reporter
from sdeks.names import VISIBILITY_TIMEOUT_S
from sdeks.tasks import TaskTable
from sdeks.webhooks import RetryPolicy, WebhookSender

log = logging.getLogger(__name__)


def build_policy(settings: DispatcherSettings) -> Policy:
    if settings.policy == "fifo":
        return FifoPolicy()
    return AffinityPolicy(
        costs=CostModel(
            inference=settings.inference_estimate_s,
            ram=settings.load_ram_s,
            disk=settings.load_disk_s,
            remote=settings.load_remote_s,
        ),
        max_wait=settings.max_wait_s,
    )


async def serve(
    settings: DispatcherSettings,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    resolver: Resolver = system_resolver,
    discovery: Any | None = None,
) -> None:
    """Run until `stop` is set, then drain. `resolver` and `discovery` are injectable for tests."""
    metrics = metrics or Metrics()
    async with contextlib.AsyncExitStack() as stack:
        sqs = await stack.enter_async_context(aio_client("sqs"))
        sns = await stack.enter_async_context(aio_client("sns"))
        s3 = await stack.enter_async_context(aio_client("s3"))
        # Pod calls last minutes; the pool must not cap the window.
        pod_session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        )
        links = await stack.enter_async_context(
            LinkResolver(LinkPolicy.from_settings(settings), s3=s3, resolver=resolver)
        )

        table = None
        if settings.task_table:
            dynamodb = await stack.enter_async_context(aio_client("dynamodb"))
            table = TaskTable(dynamodb, settings.task_table, ttl_s=settings.task_ttl_s)
        reporter = Reporter(
            sns,
            settings.callback_topic_arn,
            table=table,
            republish_after_s=settings.callback_republish_after_s,
            signing_secret=(
                settings.callback_secret.get_secret_value() if settings.callback_secret else None
            ),
        )

        sources = await queue_sources(sqs, settings)
        urls = [s.queue_url for s in sources]
        if settings.webhook_queue_url:
            urls.append(settings.webhook_queue_url)
        extension = settings.lease_extension_s or (
            await queue_visibility(sqs, urls) or VISIBILITY_TIMEOUT_S
        )
        interval = settings.heartbeat_interval_s or extension / 3
        leases = LeaseKeeper(
            sqs,
            extension_s=extension,
            interval_s=interval,
            on_lost=lambda _lease: metrics.lost_leases.inc(),
        )
        if settings.webhook_queue_url and table is not None and settings.webhook_secret:
            sender = WebhookSender(
                links.session,
                secret=settings.webhook_secret.get_secret_value(),
                guard=links.check_url,
                table=table,
                retry=RetryPolicy(
                    retries=settings.webhook_retries, timeout_s=settings.webhook_timeout_s
                ),
            )
            webhooks = WebhookConsumer(
                sqs,
                settings.webhook_queue_url,
                table=table,
                sender=sender,
                leases=leases,
                concurrency=settings.webhook_concurrency,
                wait_s=settings.receive_wait_s,
            )
            delivering = asyncio.create_task(webhooks.run(), name="webhooks")
            stack.push_async_callback(_cancel, delivering)

        router = Router(
            build_policy(settings),
            PodClient(
                pod_session,
                job_timeout_s=settings.job_timeout_s,
                state_timeout_s=settings.state_timeout_s,
                token=settings.pod_token.get_secret_value() if settings.pod_token else None,
            ),
            metrics=metrics,
            state_interval_s=settings.state_interval_s,
            failure_threshold=settings.pod_failure_threshold,
            share_demand=settings.share_demand,
        )
        if discovery is None:
            discovery = (
                KubernetesDiscovery.from_settings(settings)
                if settings.discovery == "kubernetes"
                else StaticDiscovery(settings.pods)
            )
        discovering = asyncio.create_task(discovery.run(router.set_pods), name="discovery")
        stack.push_async_callback(_cancel, discovering)
        if settings.metrics_port:
            runner = await start_metrics_server(
                metrics, host=settings.metrics_host, port=settings.metrics_port
            )
            stack.push_async_callback(runner.cleanup)
            log.info(
                "metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port
            )
        log.info(
            "leases: extension %d s, heartbeat every %g s; policy %s",
            extension,
            interval,
            router.policy.name,
        )
        dispatcher = Dispatcher(
            settings,
            sqs=sqs,
            sns=sns,
            s3=s3,
            links=links,
            router=router,
            leases=leases,
            metrics=metrics,
            sources=sources,
            reporter=reporter,
        )
        await dispatcher.run(stop)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
