"""The whole pipeline on the embedded local stack, shared by the end-to-end tests."""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator

import pytest

from sdeks.client import SdeksClient
from sdeks.local import LocalStack


@pytest.fixture(scope="package")
def local(tmp_path_factory) -> Iterator[LocalStack]:
    stack = LocalStack(workdir=tmp_path_factory.mktemp("local"), moto_port=0)
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
    """Serves /img.png on 127.0.0.1 (an http:// init image link)."""
    payload = png_bytes(color=(30, 160, 90))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/img.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
