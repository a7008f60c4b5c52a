"""Signed webhook delivery of terminal callbacks (issue 5, docs/lifecycle.md).

Signing: ``X-Sdeks-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
with the Unix time in ``X-Sdeks-Timestamp``; receivers call `verify_signature`.
Several ``v1=`` values, comma-separated, may appear while a secret is rotated.

Delivery: `WebhookSender` POSTs the callback JSON, retrying connection errors,
timeouts, 429 and 5xx with exponential backoff and jitter; other answers are
final. Every attempt first asks the injected `UrlGuard` (the dispatcher's SSRF
guard for image links), so a private address is refused before any connection,
and redirects are never followed (a redirect could lead past the guard).

Where it runs: in the dispatcher, fed by a ``webhooks`` SQS queue subscribed to
the callback topic with `WEBHOOK_FILTER_POLICY`; `deliver_notification` handles
one message from it. Every terminal callback passes through that topic whoever
published it (pod, dispatcher, ``sdeks cancel``), the queue keeps it across
crashes, and no GPU waits on a slow receiver.

Only signing and verification are needed by receivers: aiohttp is imported by
the sender alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sdeks.callback import Callback, TaskStatus
from sdeks.envelope import unwrap_sns
from sdeks.errors import LinkForbiddenError, SdeksError
from sdeks.tasks import TaskTable, WebhookStatus

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sdeks-Signature"
TIMESTAMP_HEADER = "X-Sdeks-Timestamp"
TASK_ID_HEADER = "X-Sdeks-Task-Id"
ATTEMPT_HEADER = "X-Sdeks-Attempt"
SIGNATURE_VERSION = "v1"
#: Receivers refuse signatures older (or newer) than this: replay protection.
DEFAULT_TOLERANCE_S = 300
#: Filter policy of the `webhooks` queue's subscription to the callback topic.
WEBHOOK_FILTER_POLICY: dict[str, list[str]] = {
    "status": [s.value for s in TaskStatus if s.terminal]
}


# --- signing (sender and receiver) ------------------------------------------------


def compute_signature(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}." + body``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_headers(
    secret: str | bytes, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: f"{SIGNATURE_VERSION}={compute_signature(secret, stamp, body)}",
    }


def verify_signature(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when `body` was signed with `secret` within `tolerance_s` of now.

    `headers` may be any mapping (header names are matched case-insensitively);
    `body` must be the raw request bytes, before any JSON parsing.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    stamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    try:
        signed_at = int(stamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - signed_at) > tolerance_s:
        return False
    expected = compute_signature(secret, signed_at, body)
    for part in given.split(","):
        version, _, value = part.strip().partition("=")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value, expected):
            return True
    return False


# --- delivery -------------------------------------------------------------------


class UrlGuard(Protocol):
    """Checks a URL before each connection; the dispatcher's SSRF guard for image links.

    Raise `LinkForbiddenError` to refuse (private, loopback, link-local or
    metadata addresses, bad scheme); any other `SdeksError` (say, DNS failure)
    counts as a failed, retryable attempt.
    """

    async def __call__(self, url: str) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    #: Retries after the first attempt.
    retries: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    #: Whole-request timeout of one attempt.
    timeout_s: float = 10.0

    def delay_s(self, retry: int, retry_after_s: float | None = None) -> float:
        """Backoff before retry number `retry` (1-based): exponential, half jittered,
        so a fleet of senders does not hammer a recovering receiver in step."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** (retry - 1))
        delay: float = ceiling * random.uniform(0.5, 1.0)
        if retry_after_s is not None:  # the receiver said when; within our ceiling
            delay = max(delay, min(retry_after_s, self.max_delay_s))
        return delay


@dataclass(frozen=True)
class WebhookOutcome:
    status: WebhookStatus
    attempts: int
    http_status: int | None = None
    error: str | None = None


class WebhookSender:
    """POSTs signed callbacks; records each final outcome in the task table if given.

    `session` is injected (the dispatcher passes one whose connector resolves
    through its guard, so the address checked is the address connected to).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        secret: str | bytes,
        guard: UrlGuard,
        table: TaskTable | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not secret:
            raise ValueError("a webhook secret is required (SDEKS_WEBHOOK_SECRET)")
        self._session = session
        self._secret = secret
        self._guard = guard
        self._table = table
        self.retry = retry or RetryPolicy()

    async def deliver(self, url: str, callback: Callback) -> WebhookOutcome:
        """Deliver with retries and record the outcome. Never raises for the receiver's
        faults; only cancellation escapes."""
        outcome = await self._attempts(url, callback)
        level = logging.INFO if outcome.status is WebhookStatus.DELIVERED else logging.WARNING
        log.log(
            level,
            "task %s: webhook %s after %d attempt(s) (http %s, %s)",
            callback.id,
            outcome.status,
            outcome.attempts,
            outcome.http_status,
            outcome.error,
        )
        if self._table is not None and callback.id is not None:
            try:
                await self._table.record_webhook_outcome(
                    callback.id,
                    status=outcome.status,
                    attempts=outcome.attempts,
                    http_status=outcome.http_status,
                    error=outcome.error,
                )
            except SdeksError as exc:
                log.warning("task %s: webhook outcome not recorded: %s", callback.id, exc)
        return outcome

    async def _attempts(self, url: str, callback: Callback) -> WebhookOutcome:
        import aiohttp  # the dispatcher extra carries it; receivers need only verify

        body = callback.model_dump_json().encode()
        attempts = 0
        http_status: int | None = None
        error: str | None = None
        for number in range(1, self.retry.retries + 2):
            retry_after: float | None = None
            try:
                await self._guard(url)
            except LinkForbiddenError as exc:
                return WebhookOutcome(WebhookStatus.REFUSED, attempts, None, exc.message)
            except SdeksError as exc:
                error = exc.message
            else:
                attempts += 1
                headers = {
                    "Content-Type": "application/json",
                    TASK_ID_HEADER: callback.id or "",
                    ATTEMPT_HEADER: str(number),
                    **signature_headers(self._secret, body),
                }
                try:
                    async with self._session.post(
                        url,
                        data=body,
                        headers=headers,
                        allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=self.retry.timeout_s),
                    ) as response:
                        http_status = response.status
                        retry_after = _retry_after_s(response.headers)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    http_status, error = None, f"{type(exc).__name__}: {exc}"[:300]
                else:
                    if 200 <= http_status < 300:
                        return WebhookOutcome(WebhookStatus.DELIVERED, attempts, http_status)
                    error = f"HTTP {http_status}"
                    if http_status != 429 and http_status < 500:
                        # 3xx (not followed) and 4xx: retrying would get the same answer.
                        return WebhookOutcome(WebhookStatus.FAILED, attempts, http_status, error)
            if number <= self.retry.retries:
                await asyncio.sleep(self.retry.delay_s(number, retry_after))
        return WebhookOutcome(WebhookStatus.FAILED, attempts, http_status, error)


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare, and our own backoff is good enough


async def deliver_notification(
    body: str, *, table: TaskTable, sender: WebhookSender
) -> WebhookOutcome | None:
    """Handle one message of the ``webhooks`` queue (an SNS notification of a callback).

    Looks up the task's webhook URL and its claimed terminal callback in the
    table, and delivers that callback; the notification only says which task
    ended. None when there is nothing to do (no webhook, nothing claimed,
    already delivered on an earlier receipt). The consumer deletes the message
    after this returns, whatever the outcome.
    """
    notification = unwrap_sns(body)
    try:
        callback = Callback.model_validate_json(notification.body)
    except ValueError:
        log.warning("webhooks queue: not a callback, dropped: %.200s", notification.body)
        return None
    if callback.id is None or not callback.status.terminal:
        return None
    record = await table.get(callback.id)
    if record is None or not record.webhook:
        return None
    if record.webhook_status is WebhookStatus.DELIVERED:
        return None
    claimed = record.terminal_callback()
    if claimed is None:
        log.warning("task %s: no claimed terminal callback; webhook not sent", callback.id)
        return None
    # Deliver the one callback the task table holds as this task's end, never the
    # notification's body: whoever may publish to the callback topic could
    # otherwise have a forged body signed and delivered to the task's webhook.
    return await sender.deliver(record.webhook, claimed)
