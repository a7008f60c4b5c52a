"""Building a console: from the environment (a deployed stack, the caller's
credentials) or from a running embedded stack (`sdeks local up`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sdeks import aws
from sdeks.console.backend import Console, ConsoleConfig, QueuePair
from sdeks.console.server import ConsoleServer
from sdeks.local import LOCAL_CREDENTIALS
from sdeks.names import StackNames, check_runtime_name

if TYPE_CHECKING:
    from sdeks.local import LocalStack

DEFAULT_PORT = 8765


def config_from_env(
    env: Mapping[str, str] | None = None,
    *,
    stack: str | None = None,
    pods: str | None = None,
    runtimes: list[str] | None = None,
    read_only: bool = False,
) -> ConsoleConfig:
    """The stack's resources from `SDEKS_*` variables, else from its names.

    `runtimes` (or ``SDEKS_RUNTIMES``, comma-separated) names the runtimes to show;
    without them the console lists the account's queues to find them.
    `pods` (or ``SDEKS_PODS``) is JSON: ``{"runtime": ["http://host:port", ...]}``,
    the pods the console may ask for their state (a port-forward, or in-cluster).
    """
    env = os.environ if env is None else env
    raw_pods = pods if pods is not None else env.get("SDEKS_PODS", "")
    try:
        pod_urls = json.loads(raw_pods) if raw_pods else {}
    except ValueError as exc:
        raise ValueError(f"--pods / SDEKS_PODS is not JSON: {exc}") from None
    if not isinstance(pod_urls, dict) or not all(
        isinstance(v, list) and all(isinstance(u, str) for u in v) for v in pod_urls.values()
    ):
        raise ValueError('--pods / SDEKS_PODS must look like {"runtime": ["http://host:port"]}')
    if runtimes is None and env.get("SDEKS_RUNTIMES"):
        runtimes = [r.strip() for r in env["SDEKS_RUNTIMES"].split(",") if r.strip()]
    for runtime in runtimes or []:
        check_runtime_name(runtime)
    return ConsoleConfig(
        runtimes=runtimes or None,
        names=StackNames(stack or env.get("SDEKS_STACK", "sdeks")),
        task_table=env.get("SDEKS_TASK_TABLE") or None,
        output_bucket=env.get("SDEKS_OUTPUT_BUCKET") or None,
        models_bucket=env.get("SDEKS_MODELS_BUCKET") or None,
        task_topic_arn=env.get("SDEKS_TASK_TOPIC_ARN") or None,
        callback_topic_arn=env.get("SDEKS_CALLBACK_TOPIC_ARN") or None,
        pods=pod_urls,
        pod_token=env.get("SDEKS_POD_TOKEN") or None,
        read_only=read_only,
    )


def for_local_stack(stack: LocalStack, *, read_only: bool = False) -> Console:
    """A console on a started embedded stack, with its clients and its pods."""
    resources = stack.resources
    assert resources, "start the stack first"
    config = ConsoleConfig(
        names=stack.names,
        task_table=resources.task_table,
        output_bucket=resources.output_bucket,
        models_bucket=resources.models_bucket,
        task_topic_arn=resources.task_topic_arn,
        callback_topic_arn=resources.callback_topic_arn,
        queues=[QueuePair(rt, url, resources.dlqs.get(rt)) for rt, url in resources.queues.items()],
        catch_all=QueuePair(
            "(catch-all)", resources.catch_all_queue_url, resources.catch_all_dlq_url
        ),
        pods=stack.pod_urls(),
        # The local stack's pods require their token, as deployed ones do.
        pod_token=stack.pod_token,
        read_only=read_only,
    )
    clients = {name: stack.client(name) for name in ("sns", "sqs", "dynamodb")}
    credentials = {
        "aws_access_key_id": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
    # SigV4 presigned links, as against a real account.
    clients["s3"] = aws.client(
        "s3", endpoint_url=stack.endpoint, credentials=credentials, signature_version="s3v4"
    )
    return Console(config, **clients)


def serve_local(
    stack: LocalStack, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT
) -> ConsoleServer:
    """Start the console of an embedded stack in a background thread."""
    return ConsoleServer(for_local_stack(stack), host=host, port=port).start()
