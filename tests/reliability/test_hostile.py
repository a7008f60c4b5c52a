"""A catalogue of hostile inputs, end to end on the local stack: each ends in exactly one
failed callback with its specific `error.code`, before any model work.

The unit layer (tests/dispatcher/test_links.py) checks the link guard's
decisions one by one, with injected resolvers; this layer publishes real
tasks through SNS and proves the whole pipeline turns each refusal into one
clear callback and keeps serving. "Before any model work" is shown two ways:
a refusal by the dispatcher leaves the task table without a `pod` (no pod
ever saw the task); an absurd size reaches a pod but is refused by its input
checks, and the model those tasks name never gets loaded on any pod.

The stack allow-lists 127.0.0.1 for links (its own image servers), so the
private addresses here are other literals: 10/8, 169.254.169.254, [::1],
[fd00::1], IPv4-mapped IPv6, and decimal/octal/hex spellings of them.
Service processes run in a loopback-only sandbox (tests/reliability/sandbox),
so even a guard that let one through could not reach it.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from sdeks.callback import Callback
from sdeks.client import SdeksClient
from sdeks.envelope import Task, TaskType
from sdeks.local import LocalStack
from tests.reliability.conftest import UNUSED_MODEL

TIMEOUT_S = 120
#: Listen this much longer after the last expected callback: a second one would show.
SETTLE_S = 3
MiB = 1024 * 1024


# --- payloads and the hostile image server -----------------------------------------


def png(width: int = 64, height: int = 64) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 8000) -> bytes:
    """A valid greyscale PNG of side x side zero pixels: 64 MB decoded, ~60 KB on the wire."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


class HostileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Serves the hostile payloads on 127.0.0.1 (allow-listed, so the payload is the test)."""
    whole = png()
    bomb = bomb_png()
    redirects = {
        "/to-private": "http://10.0.0.1/x.png",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "/to-mapped": "http://[::ffff:10.0.0.1]/x.png",
        "/to-decimal": "http://2852039166/latest/meta-data/",
        "/to-file": "file:///etc/passwd",
        "/loop": "/loop",
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/img.png":
                self._send(whole)
            elif path == "/truncated.png":
                self._send(whole[: len(whole) // 2])
            elif path == "/page.html":
                self._send(b"<html>not an image</html>", "text/html")
            elif path == "/bomb.png":
                self._send(bomb)
            elif path == "/big.png":
                self._send(b"\x89PNG" + b"\x00" * (2 * MiB))
            elif path == "/big-chunked.png":
                self._stream([b"\x00" * 65536] * 40, delay_s=0)  # 2.5 MiB, no length
            elif path == "/drip.png":
                self._stream([b"\x89"] * 40, delay_s=0.5)  # one byte every 0.5 s
            else:
                self.send_error(404)

        def _send(self, body: bytes, kind: str = "image/png") -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, chunks: list[bytes], delay_s: float) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for piece in chunks:
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.flush()
                    time.sleep(delay_s)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the dispatcher hung up: that is the point
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = HostileServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# --- helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(hostile: LocalStack) -> SdeksClient:
    assert hostile.resources
    return SdeksClient(
        sns=hostile.client("sns"),
        sqs=hostile.client("sqs"),
        s3=hostile.client("s3"),
        task_topic_arn=hostile.resources.task_topic_arn,
        callback_topic_arn=hostile.resources.callback_topic_arn,
    )


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def task(task_id: str, *, prefix: str = "hostile", model: str = "tiny-sd15", **content: Any):
    body = {"prompt": "a hostile cat", "steps": 2, "width": 64, "height": 64, **content}
    body.setdefault("alwayson_scripts", {})["sd_model_checkpoint"] = model
    return Task(
        id=task_id,
        runtime="sdruntime",
        tasktype=TaskType.IMAGE_TO_IMAGE if "init_images" in body else TaskType.TEXT_TO_IMAGE,
        prefix=prefix,
        context={"probe": task_id},
        content=body,
    ).to_envelope()


def run(client: SdeksClient, bodies: dict[str, dict]) -> dict[str, list[Callback]]:
    """Publish `bodies` (by id); every terminal callback of each id, listening on a
    little after the last one arrived."""
    with client.listen(list(bodies)) as listener:
        for body in bodies.values():
            client.publish(body, runtime="sdruntime")
        got: dict[str, list[Callback]] = {}
        first = listener.wait_terminal(bodies, timeout_s=TIMEOUT_S)
        for task_id, callback in first.items():
            got[task_id] = [callback]
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            for callback in listener.poll(wait_s=1):
                if callback.status.terminal and callback.id in got:
                    got[callback.id].append(callback)
    return got


def record(stack: LocalStack, task_id: str) -> dict[str, Any]:
    assert stack.resources
    item = (
        stack.client("dynamodb")
        .get_item(TableName=stack.resources.task_table, Key={"id": {"S": task_id}})
        .get("Item", {})
    )
    return {k: next(iter(v.values())) for k, v in item.items()}


def assert_refused(
    stack: LocalStack,
    got: dict[str, list[Callback]],
    codes: dict[str, str],
    *,
    by_pod: bool | None,
) -> None:
    """Each task failed once with its code; `by_pod`: a pod (True) or the dispatcher
    (False) refused it, None: either (the bounds both of them check)."""
    for task_id, code in codes.items():
        callbacks = got[task_id]
        assert len(callbacks) == 1, (task_id, callbacks)
        (callback,) = callbacks
        assert callback.status == "failed" and callback.result is False, callback
        assert callback.error is not None and callback.error.code == code, (task_id, callback)
        assert callback.error.message, callback
        assert callback.context == {"probe": task_id}
        assert callback.image_url == []
        row = record(stack, task_id)
        assert row["status"] == "failed", row
        # A dispatcher refusal: no pod ever marked the task running.
        if by_pod is not None:
            assert ("pod" in row) is by_pod, (task_id, row)


# --- links -------------------------------------------------------------------------

PRIVATE_LITERALS = [
    "http://10.0.0.1/x.png",
    "http://172.16.0.1/x.png",
    "http://192.168.1.1:8080/x.png",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[::1]/x.png",  # loopback, but only 127.0.0.1/32 is allow-listed
    "http://[::1]:22/x.png",
    "http://[fd00::1]/x.png",
    "http://[fe80::1]/x.png",
    "http://0.0.0.0/x.png",
    "http://127.0.0.2/x.png",
    "http://100.64.0.1/x.png",
    "http://224.0.0.1/x.png",
    "http://[::ffff:10.0.0.1]/x.png",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[2002:a9fe:a9fe::1]/latest/meta-data/",
    "http://2852039166/latest/meta-data/",  # 169.254.169.254, decimal
    "http://0xa9fea9fe/latest/meta-data/",  # hex
    "http://0251.0376.0251.0376/latest/meta-data/",  # octal
    "http://167772161/x.png",  # 10.0.0.1
    "http://0x7f.2/x.png",  # 127.0.0.2
    "http://10.1/x.png",  # 10.0.0.1, short form
    "https://10.0.0.1:6379/x.png",
]
SCHEMES = [
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_GET",
    "ftp://127.0.0.1/x.png",
    "dict://127.0.0.1:11211/stats",
    "ldap://127.0.0.1/x",
]


def test_hostile_links_each_end_in_one_failed_callback_from_the_dispatcher(hostile, client, server):
    cases: dict[str, tuple[str, str]] = {}  # id -> (link, code)
    for n, link in enumerate(PRIVATE_LITERALS):
        cases[new_id(f"private{n}")] = (link, "link_forbidden")
    for n, link in enumerate(SCHEMES):
        cases[new_id(f"scheme{n}")] = (link, "link_forbidden")
    cases[new_id("s3-bucket")] = ("s3://some-other-tenants-bucket/x.png", "link_forbidden")
    for path, code in [
        ("/to-private", "link_forbidden"),
        ("/to-metadata", "link_forbidden"),
        ("/to-mapped", "link_forbidden"),
        ("/to-decimal", "link_forbidden"),
        ("/to-file", "link_forbidden"),
        ("/loop", "link_unreachable"),
        ("/big.png", "link_too_large"),
        ("/big-chunked.png", "link_too_large"),
        ("/drip.png", "link_unreachable"),
        ("/truncated.png", "not_an_image"),
        ("/page.html", "not_an_image"),
        ("/bomb.png", "not_an_image"),
        ("/missing.png", "link_unreachable"),
    ]:
        cases[new_id(path.strip("/").replace(".", "-"))] = (server + path, code)
    cases[new_id("port1")] = ("http://127.0.0.1:1/x.png", "link_unreachable")
    bodies = {i: task(i, init_images=[link]) for i, (link, _) in cases.items()}
    # Links are found anywhere in content, not only in init_images.
    mask_id, nested_id, many_id = new_id("mask"), new_id("nested"), new_id("many")
    bodies[mask_id] = task(mask_id, init_images=[server + "/img.png"], mask="http://10.0.0.1/m.png")
    cases[mask_id] = ("http://10.0.0.1/m.png", "link_forbidden")
    bodies[nested_id] = task(nested_id, extra={"deep": [{"image": "http://169.254.169.254/"}]})
    cases[nested_id] = ("http://169.254.169.254/", "link_forbidden")
    bodies[many_id] = task(many_id, init_images=[f"{server}/img.png?n={n}" for n in range(17)])
    cases[many_id] = ("17 links", "link_forbidden")

    got = run(client, bodies)

    assert_refused(hostile, got, {i: code for i, (_, code) in cases.items()}, by_pod=False)
    for task_id, (link, _) in cases.items():
        message = got[task_id][0].error.message  # type: ignore[union-attr]
        assert link[:60] in message, (link, message)  # a clear message names the link


# --- ids and prefixes ------------------------------------------------------------------

HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    "a/b",
    "/abs",
    ".hidden",
    "-lead",
    "x" * 129,
    "id with space",
    "%2e%2e%2fpasswd",
    "a\\b",
    "caf\u00e9",
    "nul\u0000byte",
    "",
]
HOSTILE_PREFIXES = [
    "../../x",
    "/abs",
    "a//b",
    "a/./b",
    "a/../../b",
    "rejected/x",
    "x" * 300,
    "a\\..\\b",
    "%2e%2e/x",
    "",
]


def test_path_tricks_in_ids_and_prefixes_are_refused_and_write_nothing(hostile, client):
    assert hostile.resources
    s3 = hostile.client("s3")
    bucket = hostile.resources.output_bucket

    def kept() -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="rejected/")
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    before = set(kept())
    # Bad prefixes, readable ids: the callback carries the id.
    prefixed = {new_id(f"prefix{n}"): p for n, p in enumerate(HOSTILE_PREFIXES)}
    published = {i: task(i) for i in prefixed}
    for task_id, prefix in prefixed.items():
        published[task_id]["task"]["metadata"]["prefix"] = prefix  # `Task` would refuse it
    got = run(client, published)
    for task_id in prefixed:
        (callback,) = got[task_id]
        assert callback.status == "failed" and callback.error is not None
        assert callback.error.code == "invalid_envelope" and "prefix" in callback.error.message

    # Bad ids: no id to call back with, so count anonymous invalid_envelope callbacks.
    marker = uuid.uuid4().hex
    with client.listen() as listener:
        for n, bad in enumerate(HOSTILE_IDS):
            body = task("placeholder", prefix=f"ids-{marker}")
            body["task"]["metadata"]["id"] = bad
            body["task"]["content"]["prompt"] = f"{marker}-{n}"
            client.publish(body, runtime="sdruntime")
        anonymous: list[Callback] = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(anonymous) < len(HOSTILE_IDS) and time.monotonic() < deadline:
            anonymous += [c for c in listener.poll(wait_s=1) if c.id is None]
        settle = time.monotonic() + SETTLE_S
        while time.monotonic() < settle:
            anonymous += [c for c in listener.poll(wait_s=1) if c.id is None]
    assert len(anonymous) == len(HOSTILE_IDS)
    assert {(c.status, c.error.code if c.error else None) for c in anonymous} == {
        ("failed", "invalid_envelope")
    }
    assert all("id" in c.error.message for c in anonymous if c.error)

    # Every refused body is kept for audit, and nothing was written outside rejected/.
    new = set(kept()) - before
    bodies = [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())["body"] for k in new]
    assert sum(marker in b for b in bodies) == len(HOSTILE_IDS)
    assert len(new) == len(HOSTILE_IDS) + len(HOSTILE_PREFIXES)
    every = [
        o["Key"]
        for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in p.get("Contents", [])
    ]
    outside = [
        k
        for k in every
        if not k.startswith(("rejected/", "hostile/", "poison/"))
        or ".." in k.split("/")
        or "//" in k
    ]
    assert outside == []


# --- absurd sizes --------------------------------------------------------------------

ABSURD = {
    "wide": {"width": 100_000, "height": 100_000},
    "huge-int": {"width": 2**63, "height": 64},
    "odd": {"width": 65},
    "negative": {"width": -64},
    "zero": {"height": 0},
    "text": {"height": "tall"},
    "steps": {"steps": 10**9},
    "no-steps": {"steps": 0},
    "batch": {"batch_size": 10**6},
    "iterations": {"n_iter": 10**6},
    "images": {"batch_size": 8, "n_iter": 3},
    "cfg": {"cfg_scale": 1e308},
    "strength": {"denoising_strength": 7.5},
}


def test_absurd_sizes_are_refused_before_the_model_is_loaded(hostile, client):
    import base64

    absurd = {
        **ABSURD,
        # Inline images skip the dispatcher's link checks: the pod checks them itself.
        "inline-bomb": {"init_images": [base64.b64encode(bomb_png()).decode()]},
        "inline-garbage": {"init_images": [base64.b64encode(b"not an image").decode()]},
    }
    cases = {new_id(f"absurd-{name}"): fields for name, fields in absurd.items()}
    got = run(client, {i: task(i, model=UNUSED_MODEL, **f) for i, f in cases.items()})

    # The dispatcher checks the numeric bounds (sdeks.bounds) before routing; the pod
    # checks them again and decodes inline images itself: either may refuse.
    assert_refused(hostile, got, dict.fromkeys(cases, "invalid_parameter"), by_pod=None)
    assert all("pod" in record(hostile, i) for i in cases if "inline" in i), cases
    for task_id, fields in cases.items():
        message = got[task_id][0].error.message  # type: ignore[union-attr]
        assert any(f"`{name}`" in message or name in message for name in fields), message
    # The model only these tasks name was never loaded anywhere: no model work happened.
    for pod in hostile.pods["sdruntime"]:
        state = json.loads(_get(f"{pod.url}/v1/state", hostile.pod_headers()))
        tiers = state["models"]
        held = {m for tier in ("gpu", "ram", "disk", "loading") for m in tiers.get(tier, [])}
        assert UNUSED_MODEL not in held, (pod.name, tiers)


def _get(url: str, headers: dict[str, str]) -> bytes:
    import urllib.request

    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


# --- the pipeline still serves --------------------------------------------------------------


def test_pipeline_still_renders_after_the_hostile_catalogue(hostile, client, server):
    ok_id, link_id = new_id("after"), new_id("after-link")
    got = run(
        client,
        {ok_id: task(ok_id), link_id: task(link_id, init_images=[server + "/img.png"])},
    )
    for task_id in (ok_id, link_id):
        (callback,) = got[task_id]
        assert callback.status == "succeeded", callback.error
        assert len(callback.image_url) == 1
