"""The SSRF-safe link resolver against local HTTP servers.

No test may reach beyond loopback even if the guard were wrong: names that
"resolve to private addresses" come from an injected resolver, and private
or metadata addresses are handed over as literals that must be refused
before any connection (pytest-socket blocks everything but 127.0.0.1/::1).
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from PIL import Image

from dispatcher.links import (
    AddressPolicy,
    LinkPolicy,
    LinkResolver,
    find_links,
    system_resolver,
)
from sdeks import aws as sdeks_aws
from sdeks.errors import (
    LinkForbiddenError,
    LinkTooLargeError,
    LinkUnreachableError,
    NotAnImageError,
)

LOCAL = ("127.0.0.1/32",)


def png(size: tuple[int, int] = (4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`x`height` (a bomb's shape) with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


class Server:
    def __init__(self) -> None:
        self.app = web.Application()
        self.url = ""
        self.hits: list[str] = []
        self.concurrent = 0
        self.max_concurrent = 0

    def route(self, path: str, handler) -> None:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.hits.append(request.path)
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
            try:
                return await handler(request)
            finally:
                self.concurrent -= 1

        self.app.router.add_get(path, wrapped)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    image = png()

    async def image_handler(_: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    async def slow_image(_: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(body=image, content_type="image/png")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * 4096, content_type="image/png")

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(8):
            await response.write(b"x" * 1024)
        await response.write_eof()
        return response

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):  # one byte every 0.2 s: never done within the total timeout
            await response.write(b"x")
            await asyncio.sleep(0.2)
        return response

    async def text(_: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    async def bomb(_: web.Request) -> web.Response:
        return web.Response(body=png_header_only(50_000, 50_000), content_type="image/png")

    async def missing(_: web.Request) -> web.Response:
        return web.Response(status=404)

    def redirect_to(target: str):
        async def handler(_: web.Request) -> web.Response:
            raise web.HTTPFound(target.replace("{base}", srv.url))

        return handler

    srv.route("/cat.png", image_handler)
    srv.route("/slow.png", slow_image)
    srv.route("/big.png", big)
    srv.route("/big-chunked.png", big_chunked)
    srv.route("/drip.png", drip)
    srv.route("/page.html", text)
    srv.route("/bomb.png", bomb)
    srv.route("/missing.png", missing)
    srv.route("/to-private", redirect_to("http://10.0.0.1/cat.png"))
    srv.route("/to-metadata-name", redirect_to("http://metadata.test/latest/meta-data"))
    srv.route("/to-file", redirect_to("file:///etc/passwd"))
    srv.route("/to-cat", redirect_to("{base}/cat.png"))
    srv.route("/loop", redirect_to("{base}/loop"))

    runner = web.AppRunner(srv.app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    srv.url = f"http://127.0.0.1:{port}"
    yield srv
    await runner.cleanup()


def fake_dns(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]

    return resolve


def resolver(**policy) -> LinkResolver:
    dns = policy.pop("dns", {})
    calls = policy.pop("calls", None)
    return LinkResolver(
        LinkPolicy(**{"allow_nets": LOCAL, **policy}), resolver=fake_dns(dns, calls)
    )


# --- address policy ---------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.0.0.2",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # the instance metadata service
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",  # the IPv6 metadata service
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "::127.0.0.1",  # IPv4-compatible
    ],
)
def test_address_policy_refuses_non_public(address):
    assert AddressPolicy().refusal(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_address_policy_allows_public(address):
    assert AddressPolicy().refusal(address) is None


def test_address_policy_allow_list_is_exact():
    policy = AddressPolicy.from_cidrs(["127.0.0.1/32", "10.8.0.0/16"])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("10.8.3.4") is None
    assert policy.refusal("127.0.0.2") == "loopback"
    assert policy.refusal("169.254.169.254") == "link-local"


# --- finding links ----------------------------------------------------------


def test_find_links_anywhere_in_content_but_text_fields():
    content = {
        "prompt": "http://example.com/not-a-link.png",
        "init_images": ["https://a.test/1.png", "data:image/png;base64,AAAA"],
        "mask": "s3://bucket/mask.png",
        "alwayson_scripts": {"controlnet": {"args": [{"image": "http://b.test/c.png"}]}},
        "note": "see http://x.test/y for details",
        "evil": "file:///etc/passwd",
    }
    assert find_links(content) == [
        "https://a.test/1.png",
        "s3://bucket/mask.png",
        "http://b.test/c.png",
        "file:///etc/passwd",
    ]


# --- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "link",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://10.0.0.1/cat.png",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::1]:8080/cat.png",
        "http://127.0.0.2/cat.png",
    ],
)
async def test_links_refuse_private_literals_before_connecting(link):
    async with resolver() as links:
        with pytest.raises(LinkForbiddenError, match="address"):
            await links.fetch(link)


async def test_links_refuse_names_resolving_to_private_addresses():
    dns = {
        "metadata.test": ["169.254.169.254"],
        "mixed.test": ["93.184.216.34", "10.0.0.7"],  # one bad address is enough
        "v6.test": ["fe80::1"],
    }
    async with resolver(dns=dns) as links:
        for host in dns:
            with pytest.raises(LinkForbiddenError, match="resolves to"):
                await links.fetch(f"http://{host}/x.png")


async def test_links_refuse_numeric_ipv4_forms_that_resolve_to_loopback():
    # glibc reads "2130706433" and "0x7f.1" as 127.0.0.1 without any DNS traffic
    async with LinkResolver(LinkPolicy(), resolver=system_resolver) as links:
        for link in ("http://2130706433/x.png", "http://0x7f.1/x.png"):
            with pytest.raises(LinkForbiddenError):
                await links.fetch(link)


@pytest.mark.parametrize(
    "link", ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://x.test/1"]
)
async def test_links_refuse_other_schemes(link):
    async with resolver() as links:
        with pytest.raises(LinkForbiddenError, match="scheme"):
            await links.fetch(link)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/to-private", LinkForbiddenError),
        ("/to-metadata-name", LinkForbiddenError),
        ("/to-file", LinkForbiddenError),
        ("/loop", LinkUnreachableError),
    ],
)
async def test_links_recheck_every_redirect(server, path, error):
    async with resolver(dns={"metadata.test": ["169.254.169.254"]}, max_redirects=3) as links:
        with pytest.raises(error) as caught:
            await links.fetch(server.url + path)
    assert server.url + path in caught.value.message


async def test_links_follow_allowed_redirect(server):
    async with resolver() as links:
        assert await links.fetch(server.url + "/to-cat") == png()


async def test_links_connect_to_the_checked_address_only(server):
    # GIVEN a name whose second lookup would rebind to a private address
    calls: list[str] = []
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])

    async def rebinding(host: str) -> list[str]:
        calls.append(host)
        return next(answers)

    port = server.url.rsplit(":", 1)[1]
    async with LinkResolver(LinkPolicy(allow_nets=LOCAL), resolver=rebinding) as links:
        # WHEN it is fetched THEN one lookup is made, checked, and connected to
        assert await links.fetch(f"http://rebind.test:{port}/cat.png") == png()
    assert calls == ["rebind.test"]


async def test_links_size_cap(server):
    async with resolver(max_bytes=1024) as links:
        with pytest.raises(LinkTooLargeError, match="4096 bytes"):
            await links.fetch(server.url + "/big.png")
        with pytest.raises(LinkTooLargeError, match="over the cap"):
            await links.fetch(server.url + "/big-chunked.png")


async def test_links_total_timeout_stops_slow_drip(server):
    async with resolver(timeout_s=1.0) as links:
        with pytest.raises(LinkUnreachableError, match="did not complete within 1 s"):
            await links.fetch(server.url + "/drip.png")


async def test_links_http_error_and_refused_connection(server):
    async with resolver() as links:
        with pytest.raises(LinkUnreachableError, match="HTTP 404"):
            await links.fetch(server.url + "/missing.png")
        with pytest.raises(LinkUnreachableError, match="127.0.0.1:9"):
            await links.fetch("http://127.0.0.1:9/x.png")
        with pytest.raises(LinkUnreachableError, match="cannot resolve"):
            await links.fetch("http://no-such-host.test/x.png")


async def test_links_must_decode_as_image(server):
    async with resolver() as links:
        with pytest.raises(NotAnImageError, match="page.html"):
            await links.fetch_base64(server.url + "/page.html")


async def test_links_refuse_decompression_bomb_from_header(server):
    async with resolver(max_pixels=4096 * 4096) as links:
        with pytest.raises(NotAnImageError, match="bomb"):
            await links.fetch_base64(server.url + "/bomb.png")


async def test_links_pixel_limit():
    async with resolver(max_pixels=10) as links:
        data = png((4, 4))
        from dispatcher.links import check_image

        with pytest.raises(NotAnImageError, match="over the limit of 10 pixels"):
            check_image(data, url="http://x.test/a.png", max_pixels=links.policy.max_pixels)


async def test_links_resolve_content_concurrently_and_replace(server):
    links_in = [f"{server.url}/slow.png?n={i}" for i in range(4)]
    content = {"init_images": links_in, "prompt": "x", "steps": 3}
    async with resolver() as links:
        resolved = await links.resolve_content(content)
    assert [base64.b64decode(s) for s in resolved.content["init_images"]] == [png()] * 4
    assert resolved.content["prompt"] == "x" and resolved.content["steps"] == 3
    assert server.max_concurrent >= 2


async def test_links_too_many_in_one_task():
    content = {"init_images": [f"http://a.test/{i}.png" for i in range(5)]}
    async with resolver(max_links=4) as links:
        with pytest.raises(LinkForbiddenError, match="5 links"):
            await links.resolve_content(content)


async def test_links_s3_allow_list(aws, stack):
    aws.s3.put_object(Bucket=stack.models_bucket, Key="in/cat.png", Body=png())
    async with sdeks_aws.aio_client("s3") as s3:
        policy = LinkPolicy(s3_buckets=frozenset({stack.models_bucket}))
        async with LinkResolver(policy, s3=s3) as links:
            assert await links.fetch(f"s3://{stack.models_bucket}/in/cat.png") == png()
            with pytest.raises(LinkForbiddenError, match="not allowed"):
                await links.fetch(f"s3://{stack.output_bucket}/in/cat.png")
            with pytest.raises(LinkUnreachableError, match="missing.png"):
                await links.fetch(f"s3://{stack.models_bucket}/missing.png")
        small = LinkPolicy(s3_buckets=frozenset({stack.models_bucket}), max_bytes=10)
        async with LinkResolver(small, s3=s3) as links:
            with pytest.raises(LinkTooLargeError):
                await links.fetch(f"s3://{stack.models_bucket}/in/cat.png")


# --- properties -----------------------------------------------------------------

import ipaddress  # noqa: E402

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_address_policy_ipv4_only_public_unicast_passes(value):
    ip = ipaddress.IPv4Address(value)
    allowed = AddressPolicy().refusal(str(ip)) is None
    assert allowed == (ip.is_global and not ip.is_multicast)
    # the same address wrapped in IPv6 gets the same answer
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    assert (AddressPolicy().refusal(str(mapped)) is None) == allowed
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value)
    assert (AddressPolicy().refusal(str(nat64)) is None) == allowed


@given(
    st.recursive(
        st.text(max_size=8) | st.sampled_from(["http://a.test/x.png", "s3://b/k.png"]),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=12,
    )
)
def test_replace_links_replaces_exactly_the_links_found(content):
    from dispatcher.links import replace_links

    doc = {"content": content}
    links = find_links(doc)
    replaced = replace_links(doc, {link: "B64" for link in links})
    assert find_links(replaced) == []
    if not links:
        assert replaced == doc


def test_replace_links_leaves_text_fields_alone():
    from dispatcher.links import replace_links

    url = "http://a.test/x.png"
    doc = {"prompt": url, "init_images": [url], "styles": [url]}
    assert replace_links(doc, {url: "B64"}) == {
        "prompt": url,
        "init_images": ["B64"],
        "styles": [url],
    }


async def _holder(budget, name: str, nbytes: int, order: list[str], release: asyncio.Event):
    async with budget.hold(nbytes):
        order.append(name)
        await release.wait()


async def _settle() -> None:
    """Let every ready task run until it blocks (no I/O here: a few loop turns do)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_memory_budget_serves_waiters_first_come_first_served():
    from dispatcher.links import MemoryBudget

    # GIVEN a budget of 100 with 60 held, and a large request (100) waiting for all of it
    budget = MemoryBudget(100)
    order: list[str] = []
    releases = {name: asyncio.Event() for name in ("held", "large", "small-1", "small-2")}
    held = asyncio.create_task(_holder(budget, "held", 60, order, releases["held"]))
    await asyncio.sleep(0)
    large = asyncio.create_task(_holder(budget, "large", 100, order, releases["large"]))
    await _settle()
    assert budget.waiting == 1
    # WHEN small requests arrive that would fit beside what is held
    smalls = [
        asyncio.create_task(_holder(budget, name, 10, order, releases[name]))
        for name in ("small-1", "small-2")
    ]
    await _settle()
    assert budget.waiting == 3
    # THEN they queue behind the large one instead of passing it
    assert order == ["held"] and budget.used == 60
    releases["held"].set()
    await held
    await _settle()
    assert order == ["held", "large"] and budget.used == 100
    releases["large"].set()
    await large
    releases["small-1"].set()
    releases["small-2"].set()
    await asyncio.gather(*smalls)
    assert order == ["held", "large", "small-1", "small-2"]
    assert budget.used == 0 and budget.peak == 100


async def test_memory_budget_cancelled_head_lets_the_next_waiter_through():
    from dispatcher.links import MemoryBudget

    budget = MemoryBudget(100)
    order: list[str] = []
    release = asyncio.Event()
    held = asyncio.create_task(_holder(budget, "held", 60, order, release))
    await asyncio.sleep(0)
    large = asyncio.create_task(_holder(budget, "large", 100, order, release))
    await _settle()
    small = asyncio.create_task(_holder(budget, "small", 10, order, release))
    await _settle()
    assert budget.waiting == 2
    # WHEN the large head waiter is cancelled, THEN the small one fits and goes at once
    large.cancel()
    await _settle()
    assert order == ["held", "small"] and budget.used == 70
    release.set()
    await asyncio.gather(held, small)
    assert large.cancelled() and budget.used == 0 and budget.waiting == 0
