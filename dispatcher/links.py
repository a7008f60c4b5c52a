"""SSRF-safe resolution of image links in a task's `content`.

Every string in `content` that is a whole URL (``scheme://...``) is a link:
`http(s)://` and `s3://` links are downloaded and replaced by the image's
base64; any other scheme is refused. Each refusal raises one of the
`sdeks.errors.LinkError` subclasses with a message naming the link:

    link_forbidden    scheme not http/https/s3, an address that is loopback,
                      private, link-local (169.254.169.254), multicast,
                      reserved or unspecified (IPv4, IPv6, and IPv4 embedded
                      in IPv6) and not allow-listed, a bucket not allow-listed,
                      too many links in one task
    link_unreachable  DNS, connect, TLS or HTTP error, a non-200 answer, too
                      many redirects, the total timeout
    link_too_large    declared or actual size over the cap
    not_an_image      the bytes do not decode as an allowed image format, or
                      the image is larger than the pixel limit (bombs)

Why it is safe against DNS tricks: the host is resolved once by `Resolver`,
every address is checked, and the connector is handed exactly those checked
addresses (`_PinnedResolver`), so the connection cannot go to an address that
a second lookup (DNS rebinding) would return. Redirects are followed by hand
and each hop is checked the same way. IP-literal hosts skip the connector's
resolver, so they are checked before the request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import io
import ipaddress
import logging
import re
import socket
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from sdeks.aws import parse_s3_url
from sdeks.errors import (
    LinkForbiddenError,
    LinkTooLargeError,
    LinkUnreachableError,
    NotAnImageError,
)

log = logging.getLogger(__name__)

#: host -> every address it resolves to (strings, IPv4 or IPv6).
Resolver = Callable[[str], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Used with `fullmatch` (a `$` would also match before a final newline).
_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,15})://\S+")
#: Text fields that are never links even when they hold nothing but a URL.
_TEXT_KEYS = frozenset({"prompt", "negative_prompt", "styles", "sd_model_checkpoint", "sd_vae"})
#: Formats Pillow may open: no EPS (Ghostscript), no exotic decoders.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# NAT64 well-known prefix (RFC 6052): the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


async def system_resolver(host: str) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _shorten(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a link may connect to: globally routable ones, plus `allow`."""

    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))

    def refusal(self, address: str) -> str | None:
        """Why `address` is refused, or None when it may be connected to."""
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return "not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            return "a scoped IPv6 address"
        if self._allowed(ip):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(ip)
            if embedded is not None:
                if self._allowed(embedded):
                    return None
                reason = _category(embedded)
                return f"{reason} (IPv4 {embedded} embedded in IPv6)" if reason else None
        return _category(ip)

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    # IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks)
    if int(ip) >> 32 == 0 and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip))
    return None


def _category(ip: IPAddress) -> str | None:
    # Order matters only for the message: the most specific name first.
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:  # 224.0.0.0/4 counts as "global" for the ipaddress module
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


class _PinnedResolver(AbstractResolver):
    """Hands the connector the addresses `LinkResolver` has already checked.

    A host that was not checked first cannot be connected to at all. A pin
    lasts `ttl_s`, far longer than the connection that follows its check
    (bounded by the link and webhook timeouts), and expired pins are purged
    so hosts chosen by users cannot grow the map without bound.
    """

    def __init__(self, ttl_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self._pins: dict[str, tuple[list[str], float]] = {}

    def pin(self, host: str, addresses: list[str]) -> None:
        now = time.monotonic()
        if len(self._pins) > 1024:
            self._pins = {h: p for h, p in self._pins.items() if p[1] > now}
        self._pins[host] = (addresses, now + self.ttl_s)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses, expires = self._pins.get(host, ([], 0.0))
        if not addresses or expires < time.monotonic():
            raise OSError(f"host {host!r} was not checked before connecting")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        self._pins.clear()


@dataclass(frozen=True)
class LinkPolicy:
    """The link settings, separated from `DispatcherSettings` so tests build them directly."""

    allow_nets: Sequence[str] = ()
    s3_buckets: frozenset[str] = frozenset()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 30.0
    max_redirects: int = 5
    max_pixels: int = 32 * 1024 * 1024
    max_links: int = 16
    max_task_bytes: int = 64 * 1024 * 1024
    memory_budget_bytes: int = 1024 * 1024 * 1024
    concurrency: int = 16

    @classmethod
    def from_settings(cls, settings: Any) -> LinkPolicy:
        return cls(
            allow_nets=tuple(settings.link_allow_nets),
            s3_buckets=frozenset(settings.s3_allow_buckets),
            max_bytes=settings.link_max_bytes,
            timeout_s=settings.link_timeout_s,
            max_redirects=settings.link_max_redirects,
            max_pixels=settings.link_max_pixels,
            max_links=settings.link_max_per_task,
            max_task_bytes=settings.link_max_task_bytes,
            memory_budget_bytes=settings.link_memory_budget_bytes,
            concurrency=settings.link_concurrency,
        )


@dataclass
class ResolvedContent:
    content: dict[str, Any]
    download_ms: int = 0
    links: list[str] = field(default_factory=list)


def find_links(content: Any) -> list[str]:
    """Every string in `content` that is a whole URL, in document order, deduplicated."""
    return list(count_links(content))


def count_links(content: Any) -> dict[str, int]:
    """Every link in `content` (document order) and how many times it occurs: each
    occurrence becomes its own base64 copy in the job, so caps count occurrences."""
    found: dict[str, int] = {}

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, str):
            if key not in _TEXT_KEYS and _URL_RE.fullmatch(value):
                found[value] = found.get(value, 0) + 1
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list):
            for v in value:
                walk(v, key)

    walk(content, None)
    return found


#: Memory one resolved byte costs until the pod answers: the base64 text in the job
#: (4/3), and the job's JSON body as text and as bytes (4/3 each), rounded up.
MEMORY_PER_IMAGE_BYTE = 4


class _Tally:
    """Resolved bytes of one task, each occurrence counted, against `max_task_bytes`."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.total = 0

    def add(self, nbytes: int, link: str) -> None:
        self.total += nbytes
        if self.limit is not None and self.total > self.limit:
            raise LinkTooLargeError(
                f"the task's images pass {self.limit} bytes (each occurrence of a link "
                f"counted; at {_shorten(link)})"
            )


class MemoryBudget:
    """Bytes of resolved images one dispatcher holds at once (`link_memory_budget_bytes`).

    A task reserves its worst case before any download and keeps it until its
    pod answered. Tasks that do not fit wait in arrival order: the first waiter
    is served first, and a later one, however small, does not pass it even if
    it would fit (else a stream of small tasks could starve a large one for
    good). A task larger than the whole budget waits for the budget to be empty
    and then takes all of it, so it still runs, alone.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(not future.done() for _, future in self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        want = min(nbytes, self.total)
        await self._acquire(want)
        try:
            yield
        finally:
            self.used -= want
            self._wake()

    async def _acquire(self, want: int) -> None:
        if not self._waiters and self.used + want <= self.total:
            self._take(want)
            return
        entry = (want, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            future = entry[1]
            if future.done() and not future.cancelled():
                self.used -= want  # granted, then cancelled before it resumed: give it back
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            self._wake()  # a cancelled head no longer blocks those behind it
            raise

    def _take(self, want: int) -> None:
        self.used += want
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        """Grant waiters from the head while the head fits; the budget is taken here,
        on the waiter's behalf, so nobody can slip in before it resumes."""
        while self._waiters:
            want, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.used + want > self.total:
                return
            self._waiters.popleft()
            self._take(want)
            future.set_result(None)


def replace_links(content: Any, resolved: dict[str, str], key: str | None = None) -> Any:
    """`content` with each link replaced; text fields stay as written (see `find_links`)."""
    if isinstance(content, str):
        return content if key in _TEXT_KEYS else resolved.get(content, content)
    if isinstance(content, dict):
        return {k: replace_links(v, resolved, str(k)) for k, v in content.items()}
    if isinstance(content, list):
        return [replace_links(v, resolved, key) for v in content]
    return content


def check_image(data: bytes, *, url: str, max_pixels: int) -> None:
    """Raise `NotAnImageError` unless `data` decodes as an allowed image within `max_pixels`."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                # Checked from the header, before any pixel is decoded.
                if width * height > max_pixels:
                    raise NotAnImageError(
                        f"image at {_shorten(url)} is {width}x{height}, "
                        f"over the limit of {max_pixels} pixels"
                    )
                image.load()
    except NotAnImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NotAnImageError(
            f"image at {_shorten(url)} is a decompression bomb: {exc}"[:400]
        ) from exc
    except Exception as exc:  # PIL raises many types for undecodable bytes
        raise NotAnImageError(
            f"{_shorten(url)} is not a {'/'.join(IMAGE_FORMATS)} image: {exc}"[:400]
        ) from exc


class LinkResolver:
    """Downloads links under `LinkPolicy`; one per process, used as an async context manager."""

    def __init__(
        self, policy: LinkPolicy, *, s3: Any | None = None, resolver: Resolver = system_resolver
    ) -> None:
        self.policy = policy
        self._addresses = AddressPolicy.from_cidrs(policy.allow_nets)
        self._s3 = s3
        self._resolve = resolver
        self._pins = _PinnedResolver()
        self._limit = asyncio.Semaphore(policy.concurrency)
        self._session: aiohttp.ClientSession | None = None
        self.budget = MemoryBudget(policy.memory_budget_bytes)

    async def __aenter__(self) -> LinkResolver:
        connector = aiohttp.TCPConnector(resolver=self._pins, use_dns_cache=False, limit=64)
        # trust_env=False: no proxy from the environment may carry a request elsewhere.
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- content ----------------------------------------------------------

    def reservation(self, content: dict[str, Any]) -> int:
        """The memory a task's links may cost once resolved (`MemoryBudget`): its worst
        case, bounded by the per-link and per-task caps."""
        occurrences = sum(count_links(content).values())
        worst = min(self.policy.max_task_bytes, occurrences * self.policy.max_bytes)
        return MEMORY_PER_IMAGE_BYTE * worst

    async def resolve_content(self, content: dict[str, Any]) -> ResolvedContent:
        """`content` with every link replaced by base64, downloads running concurrently."""
        counts = count_links(content)
        links = list(counts)
        if not links:
            return ResolvedContent(content=content)
        occurrences = sum(counts.values())
        if occurrences > self.policy.max_links:
            raise LinkForbiddenError(
                f"task holds {occurrences} links (each occurrence counted, {len(links)} "
                f"distinct), over the limit of {self.policy.max_links}"
            )
        started = time.monotonic()
        tally = _Tally(self.policy.max_task_bytes)
        results = await asyncio.gather(
            *(self.fetch_base64(u, tally=tally, weight=counts[u]) for u in links),
            return_exceptions=True,
        )
        for result in results:  # the first failure in document order names the link
            if isinstance(result, BaseException):
                raise result
        resolved = dict(zip(links, results, strict=True))
        return ResolvedContent(
            content=replace_links(content, resolved),  # type: ignore[arg-type]
            download_ms=int((time.monotonic() - started) * 1000),
            links=links,
        )

    async def fetch_base64(self, url: str, *, tally: _Tally | None = None, weight: int = 1) -> str:
        data = await self.fetch(url, tally=tally, weight=weight)
        await asyncio.to_thread(check_image, data, url=url, max_pixels=self.policy.max_pixels)
        return base64.b64encode(data).decode("ascii")

    async def fetch(self, url: str, *, tally: _Tally | None = None, weight: int = 1) -> bytes:
        """The bytes at `url`. `tally` counts them, `weight` times (the link's occurrences),
        against the task's cap while they arrive."""
        scheme = url.split("://", 1)[0].lower()
        tally = tally or _Tally(None)
        async with self._limit:
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    if scheme in ("http", "https"):
                        return await self._fetch_http(url, tally, weight)
                    if scheme == "s3":
                        return await self._fetch_s3(url, tally, weight)
            except TimeoutError as exc:
                raise LinkUnreachableError(
                    f"{_shorten(url)} did not complete within {self.policy.timeout_s:g} s"
                ) from exc
        raise LinkForbiddenError(
            f"link {_shorten(url)} uses scheme {scheme!r}; only http, https and s3 are allowed"
        )

    # --- http -------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        """The guarded session: it connects only to addresses `check_url` approved."""
        assert self._session is not None, "use LinkResolver as an async context manager"
        return self._session

    async def check_url(self, url: str) -> None:
        """The SSRF guard alone (for webhooks): raises `LinkForbiddenError` or
        `LinkUnreachableError`, and pins the approved addresses for `session`."""
        try:
            parsed = URL(url, encoded=False)
        except ValueError as exc:
            raise LinkForbiddenError(f"{_shorten(url)} is not a valid URL") from exc
        await self.check_host(parsed, link=url)

    async def check_host(self, url: URL, *, link: str) -> None:
        """Resolve `url`'s host, refuse it unless every address is allowed, pin the addresses."""
        if url.scheme not in ("http", "https"):
            raise LinkForbiddenError(
                f"link {_shorten(link)} leads to scheme {url.scheme!r}; only http and https are allowed"
            )
        host = url.raw_host
        if not host:
            raise LinkForbiddenError(f"link {_shorten(link)} has no host")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            try:
                addresses = await self._resolve(host)
            except OSError as exc:
                raise LinkUnreachableError(
                    f"cannot resolve the host of {_shorten(link)}: {exc}"
                ) from exc
        if not addresses:
            raise LinkUnreachableError(f"the host of {_shorten(link)} has no address")
        for address in addresses:
            reason = self._addresses.refusal(address)
            if reason:
                raise LinkForbiddenError(
                    f"link {_shorten(link)} resolves to {address}, a {reason} address"
                )
        self._pins.pin(host, addresses)

    async def _fetch_http(self, link: str, tally: _Tally, weight: int) -> bytes:
        assert self._session is not None, "use LinkResolver as an async context manager"
        try:
            url = URL(link, encoded=False)
        except ValueError as exc:
            raise LinkForbiddenError(f"link {_shorten(link)} is not a valid URL") from exc
        for _hop in range(self.policy.max_redirects + 1):
            await self.check_host(url, link=link)
            try:
                async with self._session.get(
                    url, allow_redirects=False, headers={"Accept": "image/*"}
                ) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        url = url.join(URL(response.headers["Location"]))
                        continue
                    if response.status != 200:
                        raise LinkUnreachableError(
                            f"{_shorten(link)} answered HTTP {response.status}"
                        )
                    return await self._read_capped(response, link, tally, weight)
            except aiohttp.ClientError as exc:
                raise LinkUnreachableError(
                    f"cannot download {_shorten(link)}: {exc}"[:400]
                ) from exc
            except OSError as exc:
                raise LinkUnreachableError(
                    f"cannot download {_shorten(link)}: {exc}"[:400]
                ) from exc
        raise LinkUnreachableError(
            f"{_shorten(link)} redirected more than {self.policy.max_redirects} times"
        )

    async def _read_capped(
        self, response: aiohttp.ClientResponse, link: str, tally: _Tally, weight: int
    ) -> bytes:
        cap = self.policy.max_bytes
        if response.content_length is not None and response.content_length > cap:
            raise LinkTooLargeError(
                f"{_shorten(link)} is {response.content_length} bytes, over the cap of {cap}"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > cap:
                raise LinkTooLargeError(f"{_shorten(link)} is over the cap of {cap} bytes")
            tally.add(len(chunk) * weight, link)
            chunks.append(chunk)
        return b"".join(chunks)

    # --- s3 ---------------------------------------------------------------

    async def _fetch_s3(self, link: str, tally: _Tally, weight: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            bucket, key = parse_s3_url(link)
        except ValueError as exc:
            raise LinkForbiddenError(f"link {_shorten(link)} is not a valid s3 URL") from exc
        if bucket not in self.policy.s3_buckets or not key:
            raise LinkForbiddenError(f"link {_shorten(link)}: bucket {bucket!r} is not allowed")
        if self._s3 is None:
            raise LinkForbiddenError(f"link {_shorten(link)}: s3 links are not enabled")
        cap = self.policy.max_bytes
        try:
            response = await self._s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                if int(response.get("ContentLength") or 0) > cap:
                    raise LinkTooLargeError(
                        f"{_shorten(link)} is {response['ContentLength']} bytes, over the cap of {cap}"
                    )
                tally.add(int(response.get("ContentLength") or 0) * weight, link)
                data: bytes = await body.read()
        except (ClientError, BotoCoreError) as exc:
            raise LinkUnreachableError(f"cannot read {_shorten(link)}: {exc}"[:400]) from exc
        if len(data) > cap:
            raise LinkTooLargeError(f"{_shorten(link)} is over the cap of {cap} bytes")
        return data
