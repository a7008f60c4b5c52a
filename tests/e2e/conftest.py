"""The whole pipeline on the embedded local stack, shared by the end-to-end tests."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from sdeks.client import SdeksClient
from sdeks.demo import serve_once
from sdeks.local import LocalStack


@pytest.fixture(scope="package")
def local(tmp_path_factory) -> Iterator[LocalStack]:
    stack = LocalStack(workdir=tmp_path_factory.mktemp("local"), moto_port=0, example_inputs=True)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="package")
def client(local: LocalStack) -> SdeksClient:
    assert local.resources
    return SdeksClient(
        sns=local.client("sns"),
        sqs=local.client("sqs"),
        s3=local.client("s3"),
        task_topic_arn=local.resources.task_topic_arn,
        callback_topic_arn=local.resources.callback_topic_arn,
    )


def png_bytes(size: int = 64, color: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="package")
def image_server() -> Iterator[str]:
    """Serves /img.png on 127.0.0.1 (an http:// init image link); yields the base URL."""
    server, url = serve_once(png_bytes(color=(30, 160, 90)), path="/img.png")
    yield url.removesuffix("/img.png")
    server.shutdown()
