"""The one place that builds AWS clients.

Endpoint and region come from the standard variables (`AWS_ENDPOINT_URL`,
`AWS_DEFAULT_REGION`), so the same code talks to the embedded local stack or
to a real account. Services create clients at start-up and inject them.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from botocore.config import Config

DEFAULT_REGION = "us-east-1"


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def client_config(**overrides: Any) -> Config:
    opts: dict[str, Any] = {
        "retries": {"max_attempts": 5, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 30,
        "max_pool_connections": 32,
    }
    opts.update(overrides)
    return Config(**opts)


def client(
    service: str,
    *,
    endpoint_url: str | None = None,
    credentials: dict[str, str] | None = None,
    **config: Any,
) -> Any:
    """A boto3 client; `endpoint_url` overrides `AWS_ENDPOINT_URL` when given.

    `credentials` ({"aws_access_key_id": ..., "aws_secret_access_key": ...})
    are for the embedded stack only; everywhere else the standard chain applies.
    """
    kwargs: dict[str, Any] = {"region_name": region(), "config": client_config(**config)}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    kwargs.update(credentials or {})
    return boto3.session.Session().client(service, **kwargs)


def aio_client(service: str, *, endpoint_url: str | None = None, **config: Any) -> Any:
    """An aiobotocore client context manager: ``async with aio_client("sqs") as sqs``."""
    from aiobotocore.session import get_session  # the dispatcher/runtime extras carry it

    kwargs: dict[str, Any] = {"region_name": region(), "config": client_config(**config)}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    return get_session().create_client(service, **kwargs)


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); raises ValueError on anything else."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r:.200}")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL has no bucket: {url!r:.200}")
    return bucket, key
