"""Signed callbacks: every callback published carries an HMAC of its body, made like a
webhook's (`sdeks.webhooks.compute_signature`), in two SNS message attributes:

    sdeks_signature   v1=<hex HMAC-SHA256(secret, timestamp + "." + message)>
    sdeks_timestamp   Unix time of signing

Subscribers that share the secret (`SDEKS_CALLBACK_SECRET`, the `callback-secret`
key of the deployment's internal Secret) check them with `verify_callback`, so a
callback published by anyone else, or changed on the way, is refused. docs/contract.md
shows it in a few lines.

The signature covers the message body byte for byte: verify the body exactly as
delivered (SNS's `Message` field, or the SQS body with raw delivery), before parsing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from sdeks.callback import MAX_SNS_MESSAGE_BYTES, sns_message_size
from sdeks.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_headers, verify_signature

SIGNATURE_ATTRIBUTE = "sdeks_signature"
TIMESTAMP_ATTRIBUTE = "sdeks_timestamp"


def signature_attributes(
    secret: str | bytes, message: str, *, timestamp: int | None = None
) -> dict[str, dict[str, str]]:
    """SNS `MessageAttributes` entries signing `message` (the exact `Message` string)."""
    headers = signature_headers(secret, message.encode(), timestamp=timestamp)
    return {
        SIGNATURE_ATTRIBUTE: {"DataType": "String", "StringValue": headers[SIGNATURE_HEADER]},
        TIMESTAMP_ATTRIBUTE: {"DataType": "String", "StringValue": headers[TIMESTAMP_HEADER]},
    }


def signed_limit(secret: str | bytes | None, limit: int = MAX_SNS_MESSAGE_BYTES) -> int:
    """What a callback's body and own attributes may take when the signature attributes
    are added to it: SNS counts them against the same limit (`Callback.fitted`).

    The signature's size does not depend on the message (a fixed-length hex digest);
    the timestamp's digits are today's, as when it is signed.
    """
    if not secret:
        return limit
    attributes = signature_attributes(secret, "", timestamp=int(time.time()))
    return limit - sns_message_size("", attributes)


def _value(attribute: Any) -> str:
    """An attribute value as SNS notifications (`Value`), SQS and boto3 (`StringValue`)
    or a plain mapping of strings give it."""
    if isinstance(attribute, Mapping):
        value = attribute.get("Value", attribute.get("StringValue", ""))
        return value if isinstance(value, str) else ""
    return attribute if isinstance(attribute, str) else ""


def verify_callback(
    secret: str | bytes,
    message: str | bytes,
    attributes: Mapping[str, Any],
    *,
    max_age_s: float = math.inf,
    now: float | None = None,
) -> bool:
    """True when `message` was signed with `secret` (and, with `max_age_s`, recently).

    `attributes` are the message attributes as delivered: the SNS notification's
    `MessageAttributes`, the SQS message's `MessageAttributes` (raw delivery), or
    `{name: value}`. Callbacks may wait in a queue for days, so age is not checked
    unless asked for; a subscriber that wants replay protection keeps the ids seen.
    """
    body = message.encode() if isinstance(message, str) else message
    headers = {
        SIGNATURE_HEADER: _value(attributes.get(SIGNATURE_ATTRIBUTE)),
        TIMESTAMP_HEADER: _value(attributes.get(TIMESTAMP_ATTRIBUTE)),
    }
    return verify_signature(secret, headers, body, tolerance_s=max_age_s, now=now)
