"""The task envelope: what users publish, and the normalized `Task` it becomes.

Accepted shapes (all normalized into one `Task`):

1. canonical: ``{"task": {"metadata": {...}, "content": {...}}}``
2. bare: ``{"metadata": {...}, "content": {...}}``
3. legacy A1111 body with routing keys in ``alwayson_scripts``
   (``task``, ``id_task``, ``sd_model_checkpoint``, ``save_dir``, ``image_link``)
4. serverless worker: ``{"input": {"api": {"method", "endpoint"}, "payload"}, "webhook"}``

Every field is untrusted: ids and prefixes end up in S3 keys, so they are
restricted to a safe character set and bounded length.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from sdeks.bounds import escape, excerpt, has_surrogates
from sdeks.errors import InvalidEnvelopeError
from sdeks.names import REJECTED_PREFIX, check_runtime_name

MAX_ID_LENGTH = 128
MAX_PREFIX_LENGTH = 256
MAX_WEBHOOK_LENGTH = 2048
MAX_BODY_BYTES = 1024 * 1024  # SNS caps messages at 256 KiB; anything larger is hostile
MAX_JSON_DEPTH = 64

# Always `fullmatch`: `$` also matches before a final newline ("x\n" would pass).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.=+-]+")
_WEBHOOK_RE = re.compile(r"https?://[^\s\x00-\x1f\x7f]+")


class TaskType(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    EXTRA_SINGLE_IMAGE = "extra-single-image"
    EXTRA_BATCH_IMAGES = "extra-batch-images"


def check_task_id(value: str) -> str:
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"id must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    if not _ID_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            "id may hold only letters, digits, '_', '.', '-', must start with a letter "
            f"or digit and must not contain '..', got {excerpt(value)}"
        )
    return value


def check_prefix(value: str) -> str:
    if len(value) > MAX_PREFIX_LENGTH:
        raise ValueError(f"prefix must be at most {MAX_PREFIX_LENGTH} characters, got {len(value)}")
    if value.startswith("/"):
        raise ValueError(f"prefix must not start with '/', got {excerpt(value)}")
    segments = value.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT_RE.fullmatch(segment):
            raise ValueError(
                "prefix must be '/'-separated segments of letters, digits, '_', '.', '=', "
                f"'+', '-' with no empty, '.' or '..' segment, got {excerpt(value)}"
            )
    if value + "/" == REJECTED_PREFIX or value.startswith(REJECTED_PREFIX):
        raise ValueError(f"prefix {REJECTED_PREFIX!r} is reserved for rejected messages")
    return value


def check_webhook(value: str) -> str:
    if len(value) > MAX_WEBHOOK_LENGTH:
        raise ValueError(f"webhook must be at most {MAX_WEBHOOK_LENGTH} characters")
    if has_surrogates(value) or not _WEBHOOK_RE.fullmatch(value):
        raise ValueError(
            f"webhook must be an http(s) URL without spaces or control characters, "
            f"got {excerpt(value)}"
        )
    return value


TaskId = Annotated[str, Field(min_length=1), AfterValidator(check_task_id)]
Prefix = Annotated[str, Field(min_length=1), AfterValidator(check_prefix)]
RuntimeName = Annotated[str, AfterValidator(check_runtime_name)]
WebhookUrl = Annotated[str, AfterValidator(check_webhook)]


class Task(BaseModel):
    """The normalized task every service works with."""

    model_config = ConfigDict(extra="forbid")

    id: TaskId
    runtime: RuntimeName
    tasktype: TaskType
    prefix: Prefix
    context: Any = None
    webhook: WebhookUrl | None = None
    content: dict[str, Any] = Field(default_factory=dict)

    @property
    def model(self) -> str | None:
        """The requested checkpoint: alwayson_scripts, then override_settings, else None."""
        return requested_model(self.content)

    def output_location(self, bucket: str) -> str:
        return f"s3://{bucket}/{self.prefix}/{self.id}"

    def to_envelope(self) -> dict[str, Any]:
        """The canonical wire form of this task (what a publisher sends)."""
        metadata: dict[str, Any] = {
            "id": self.id,
            "runtime": self.runtime,
            "tasktype": self.tasktype.value,
            "prefix": self.prefix,
            "context": self.context,
        }
        if self.webhook:
            metadata["webhook"] = self.webhook
        return {"task": {"metadata": metadata, "content": self.content}}


_METADATA_FIELDS = frozenset(Task.model_fields) - {"content"}


def requested_model(content: Mapping[str, Any]) -> str | None:
    for section in ("alwayson_scripts", "override_settings"):
        block = content.get(section)
        if isinstance(block, Mapping):
            name = block.get("sd_model_checkpoint")
            if isinstance(name, str) and name.strip():
                return name.strip()
    return None


# --- parsing ---------------------------------------------------------------

_SERVERLESS_ENDPOINTS = {
    "/sdapi/v1/txt2img": TaskType.TEXT_TO_IMAGE,
    "/sdapi/v1/img2img": TaskType.IMAGE_TO_IMAGE,
    "/sdapi/v1/extra-single-image": TaskType.EXTRA_SINGLE_IMAGE,
    "/sdapi/v1/extra-batch-images": TaskType.EXTRA_BATCH_IMAGES,
}
_LEGACY_TASKTYPES = {
    "text-to-image": TaskType.TEXT_TO_IMAGE,
    "txt2img": TaskType.TEXT_TO_IMAGE,
    "image-to-image": TaskType.IMAGE_TO_IMAGE,
    "img2img": TaskType.IMAGE_TO_IMAGE,
    "extra-single-image": TaskType.EXTRA_SINGLE_IMAGE,
    "extra-batch-images": TaskType.EXTRA_BATCH_IMAGES,
}
_LEGACY_ROUTING_KEYS = ("task", "id_task", "save_dir", "image_link", "runtime")


def load_json(body: str | bytes) -> Any:
    """Parse a message body, refusing oversize and absurdly nested documents."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidEnvelopeError(f"message body is {len(body)} bytes, over {MAX_BODY_BYTES}")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidEnvelopeError(f"message body is not valid JSON: {exc}"[:300]) from exc
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidEnvelopeError(f"message body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def best_effort_id(document: Any) -> str | None:
    """The task id of a document that failed to parse, if a valid one can be read."""
    if not isinstance(document, Mapping):
        return None
    candidates: list[Any] = []
    task = document.get("task")
    for holder in (task, document):
        if isinstance(holder, Mapping) and isinstance(holder.get("metadata"), Mapping):
            candidates.append(holder["metadata"].get("id"))
    scripts = document.get("alwayson_scripts")
    if isinstance(scripts, Mapping):
        candidates.append(scripts.get("id_task"))
    candidates.append(document.get("id"))
    for candidate in candidates:
        if isinstance(candidate, str):
            try:
                return check_task_id(candidate)
            except ValueError:
                continue
    return None


def parse_task(
    body: str | bytes | Mapping[str, Any],
    *,
    runtime: str | None = None,
    fallback_id: str | None = None,
    default_prefix: str = "output",
) -> Task:
    """Normalize any accepted envelope shape into a `Task`.

    `runtime` is the message's `runtime` attribute: it fills in the runtime
    for shapes that carry none (legacy, serverless). `fallback_id` (the SNS
    message id) names serverless tasks that carry no id. Raises
    `InvalidEnvelopeError` carrying the task id when one could be read.
    """
    document = load_json(body) if isinstance(body, str | bytes) else body
    if not isinstance(document, Mapping):
        raise InvalidEnvelopeError(f"message must be a JSON object, got {type(document).__name__}")
    try:
        fields = _normalize(document, runtime, fallback_id, default_prefix)
        return Task.model_validate(fields)
    except InvalidEnvelopeError as exc:
        exc.task_id = exc.task_id or best_effort_id(document)
        raise
    except ValidationError as exc:
        raise InvalidEnvelopeError(_describe(exc), task_id=best_effort_id(document)) from exc


def _normalize(
    doc: Mapping[str, Any], runtime: str | None, fallback_id: str | None, default_prefix: str
) -> dict[str, Any]:
    if "task" in doc:
        if set(doc) != {"task"}:
            extra = sorted(set(doc) - {"task"})
            raise InvalidEnvelopeError(
                f"unexpected top-level fields next to 'task': {_names(extra)}"
            )
        inner = doc["task"]
        if not isinstance(inner, Mapping):
            raise InvalidEnvelopeError("'task' must be an object with 'metadata' and 'content'")
        return _from_metadata(inner)
    if "metadata" in doc:
        return _from_metadata(doc)
    if "input" in doc:
        return _from_serverless(doc, runtime, fallback_id, default_prefix)
    if isinstance(doc.get("alwayson_scripts"), Mapping) and (
        "id_task" in doc["alwayson_scripts"] or "task" in doc["alwayson_scripts"]
    ):
        return _from_legacy(doc, runtime, default_prefix)
    raise InvalidEnvelopeError(
        "message is not a task: expected {'task': {'metadata', 'content'}}, "
        "{'metadata', 'content'}, a serverless {'input': {'api', 'payload'}} or an "
        "A1111 body with alwayson_scripts.id_task"
    )


def _from_metadata(doc: Mapping[str, Any]) -> dict[str, Any]:
    extra = sorted(set(doc) - {"metadata", "content"})
    if extra:
        raise InvalidEnvelopeError(f"unexpected fields next to 'metadata': {_names(extra)}")
    metadata = doc.get("metadata")
    if not isinstance(metadata, Mapping):
        raise InvalidEnvelopeError("'metadata' must be an object")
    content = doc.get("content", {})
    if content is None:
        content = {}
    # Unknown metadata fields are ignored (publishers add their own); the rest are Task's.
    fields = {k: v for k, v in metadata.items() if k in _METADATA_FIELDS}
    fields["content"] = content
    return fields


def _from_serverless(
    doc: Mapping[str, Any], runtime: str | None, fallback_id: str | None, default_prefix: str
) -> dict[str, Any]:
    inp = doc.get("input")
    if not isinstance(inp, Mapping):
        raise InvalidEnvelopeError("'input' must be an object with 'api' and 'payload'")
    api = inp.get("api")
    if not isinstance(api, Mapping):
        raise InvalidEnvelopeError("'input.api' must be an object with 'method' and 'endpoint'")
    method = api.get("method", "POST")
    endpoint = api.get("endpoint")
    if (
        not isinstance(method, str)
        or method.upper() != "POST"
        or not isinstance(endpoint, str)
        or endpoint not in _SERVERLESS_ENDPOINTS
    ):
        raise InvalidEnvelopeError(
            f"input.api must be POST to one of {sorted(_SERVERLESS_ENDPOINTS)}, "
            f"got method {excerpt(method)} and endpoint {excerpt(endpoint)}"
        )
    payload = inp.get("payload", {})
    task_id = doc.get("id", fallback_id)
    fields: dict[str, Any] = {
        "id": task_id,
        "runtime": doc.get("runtime", runtime),
        "tasktype": _SERVERLESS_ENDPOINTS[endpoint],
        "prefix": doc.get("prefix", default_prefix),
        "content": payload,
    }
    if "context" in doc:
        fields["context"] = doc["context"]
    if doc.get("webhook") is not None:
        fields["webhook"] = doc["webhook"]
    return fields


def _from_legacy(
    doc: Mapping[str, Any], runtime: str | None, default_prefix: str
) -> dict[str, Any]:
    scripts = dict(doc["alwayson_scripts"])
    name = scripts.get("task", "text-to-image")
    tasktype = _LEGACY_TASKTYPES.get(name) if isinstance(name, str) else None
    if tasktype is None:
        raise InvalidEnvelopeError(
            f"alwayson_scripts.task must be one of {sorted(_LEGACY_TASKTYPES)}, "
            f"got {excerpt(name)}",
        )
    content = {k: v for k, v in doc.items() if k != "alwayson_scripts"}
    link = scripts.get("image_link")
    if isinstance(link, str):
        # The sample's queue agent: comma-separated links; extras take the first as `image`.
        links = [part.strip() for part in link.split(",") if part.strip()]
        if tasktype is TaskType.EXTRA_SINGLE_IMAGE:
            content.setdefault("image", links[0] if links else link)
        else:
            content.setdefault("init_images", links or [link])
    elif link is not None:
        content.setdefault("init_images", [link])
    fields: dict[str, Any] = {
        "id": scripts.get("id_task"),
        "runtime": scripts.get("runtime", runtime),
        "tasktype": tasktype,
        "prefix": scripts.get("save_dir", default_prefix),
        "content": content,
    }
    remaining = {k: v for k, v in scripts.items() if k not in _LEGACY_ROUTING_KEYS}
    if remaining:
        content["alwayson_scripts"] = remaining
    return fields


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors in a few words each: the field path and the complaint, quoting
    input only through `excerpt` (paths hold untrusted dict keys too)."""
    parts = []
    for err in exc.errors()[:5]:
        where = field_path(err["loc"]) or "task"
        if err["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "got " not in msg:
                msg += f", got {excerpt(err.get('input'))}"
            parts.append(f"{where}: {escape(msg, 400)}")
    return "invalid task envelope: " + "; ".join(parts)


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """A pydantic error location as ``a.b[0].c``, each part escaped and bounded."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + escape(part, 40)
    return out


def _names(keys: list[Any]) -> str:
    return ", ".join(excerpt(k, 40) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")


# --- SNS notification unwrapping -------------------------------------------


#: Message attributes read from one message: SNS and SQS allow 10; names and values
#: past these lengths are not ours (ours are short) and are not kept.
MAX_ATTRIBUTES = 10
MAX_ATTRIBUTE_NAME_CHARS = 256
MAX_ATTRIBUTE_VALUE_CHARS = 4096
#: The attribute types kept: SNS's and SQS's base types (custom subtypes such as
#: ``Number.float`` or ``String.Array`` keep their full name).
ATTRIBUTE_TYPES = ("String", "Number", "Binary")


class MessageAttribute(NamedTuple):
    """One message attribute as delivered: its data type and its value as text
    (a Binary value base64-encoded)."""

    type: str
    value: str


def read_attributes(
    raw: Any, *, type_key: str, value_keys: tuple[str, ...]
) -> dict[str, MessageAttribute]:
    """The message attributes of an SNS notification (``Type``/``Value``) or an SQS
    message (``DataType``/``StringValue``/``BinaryValue``), bounded: at most
    `MAX_ATTRIBUTES`, names and values within their lengths, types of
    `ATTRIBUTE_TYPES` only. Anything else is dropped: attributes are untrusted."""
    out: dict[str, MessageAttribute] = {}
    if not isinstance(raw, Mapping):
        return out
    for name, attr in raw.items():
        if len(out) >= MAX_ATTRIBUTES:
            break
        if not (isinstance(name, str) and len(name) <= MAX_ATTRIBUTE_NAME_CHARS):
            continue
        if not isinstance(attr, Mapping):
            continue
        kind = attr.get(type_key)
        if not isinstance(kind, str) or kind.split(".", 1)[0] not in ATTRIBUTE_TYPES:
            continue
        value = next((attr[k] for k in value_keys if attr.get(k) is not None), None)
        if isinstance(value, bytes | bytearray):
            value = base64.b64encode(value).decode("ascii")
        if isinstance(value, str) and len(value) <= MAX_ATTRIBUTE_VALUE_CHARS:
            out[name] = MessageAttribute(kind, value)
    return out


def string_attributes(attributes: Mapping[str, MessageAttribute]) -> dict[str, str]:
    """The plain ``String`` ones: only these are routing hints. A ``String.Array``,
    ``Number`` or ``Binary`` `runtime` is none (docs/dispatcher.md, "Routing")."""
    return {name: a.value for name, a in attributes.items() if a.type == "String"}


class Notification(BaseModel):
    """A message as it arrives in SQS from SNS (or sent to SQS directly)."""

    body: str
    #: The plain String attributes (`string_attributes`).
    attributes: dict[str, str] = Field(default_factory=dict)
    #: Every attribute kept by `read_attributes`, with its type.
    typed_attributes: dict[str, MessageAttribute] = Field(default_factory=dict)
    message_id: str | None = None
    published_at: float | None = None  # epoch seconds

    @property
    def runtime(self) -> str | None:
        return self.attributes.get("runtime")


def unwrap_sns(sqs_body: str) -> Notification:
    """Undo SNS's JSON notification wrapper; raw bodies pass through unchanged."""
    from datetime import datetime

    try:
        doc = json.loads(sqs_body)
    except (ValueError, RecursionError):  # parse_task reports it as invalid_envelope
        return Notification(body=sqs_body)
    if not (isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc):
        return Notification(body=sqs_body)
    typed = read_attributes(doc.get("MessageAttributes"), type_key="Type", value_keys=("Value",))
    published_at = None
    stamp = doc.get("Timestamp")
    if isinstance(stamp, str):
        try:
            published_at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            published_at = None
    message = doc["Message"]
    return Notification(
        body=message if isinstance(message, str) else json.dumps(message),
        attributes=string_attributes(typed),
        typed_attributes=typed,
        message_id=doc.get("MessageId") if isinstance(doc.get("MessageId"), str) else None,
        published_at=published_at,
    )
