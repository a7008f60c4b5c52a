"""What comes back: the callback published to the callback topic, the JSON
manifest stored beside the PNGs, and the output keys they point at."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from sdeks.bounds import escape, scrub
from sdeks.envelope import Task
from sdeks.errors import SdeksError

#: SNS's limit on one message: body and attributes (names, types, values), in UTF-8 bytes.
MAX_SNS_MESSAGE_BYTES = 262_144
#: `error.message` is cut to this many characters (it quotes input only by excerpt).
MAX_ERROR_MESSAGE_CHARS = 2_000
#: `image_url` keeps at most this many UTF-8 bytes of URLs (the manifest lists them all),
#: so the callback and the task table item stay bounded (DynamoDB's 400 KB).
MAX_IMAGE_URL_BYTES = 64 * 1024
#: `info` keys that repeat the prompt per image; dropped first when a callback is too big.
BULKY_INFO_KEYS = ("all_prompts", "all_negative_prompts", "infotexts", "prompt", "negative_prompt")
#: The key of the marker that replaces a `context` too large to echo.
CONTEXT_MARKER = "sdeks_context_truncated"
#: `ignored_fields` lists at most this many names (the rest are counted in
#: `ignored_fields_dropped`), each cut to `MAX_IGNORED_FIELD_CHARS` characters and
#: escaped: the names come from the task's own keys, so they are hostile input.
MAX_IGNORED_FIELDS = 50
MAX_IGNORED_FIELD_CHARS = 64
#: Optional fields left out of the JSON while unset, so every other callback keeps its shape.
_OMITTED_WHEN_UNSET = ("image_url_truncated", "ignored_fields_dropped", "named_id")


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class Timings(BaseModel):
    """Milliseconds spent in each phase; `queued_ms` runs from publish to render start."""

    queued_ms: int = 0
    download_ms: int = 0
    model_load_ms: int = 0
    inference_ms: int = 0
    upload_ms: int = 0
    total_ms: int = 0


class ErrorInfo(BaseModel):
    code: str
    message: str

    @field_validator("message")
    @classmethod
    def _bounded(cls, value: str) -> str:
        # Messages quote input by `excerpt` only; this is the backstop for any that
        # does not, so a failed callback always serialises and fits.
        value = scrub(value)
        if len(value) > MAX_ERROR_MESSAGE_CHARS:
            value = value[:MAX_ERROR_MESSAGE_CHARS] + "... (message cut)"
        return value

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        if isinstance(exc, SdeksError):
            return cls(code=exc.code, message=exc.message)
        return cls(code="internal_error", message=f"{type(exc).__name__}: {exc}"[:500])


class Callback(BaseModel):
    """The message published to the callback topic (DESIGN.md, "The callback")."""

    model_config = ConfigDict(extra="allow")

    id: str | None
    runtime: str | None = None
    tasktype: str | None = None
    status: TaskStatus
    result: bool = False
    output_location: str | None = None
    image_url: list[str] = Field(default_factory=list)
    output_url: str | None = None
    seeds: list[int] = Field(default_factory=list)
    context: Any = None
    error: ErrorInfo | None = None
    timings: Timings = Field(default_factory=Timings)
    #: A1111 `info` (seed, all_seeds, infotexts, ...) on success.
    info: dict[str, Any] | None = None
    #: `content` fields the task type does not know (a misspelled `promt`): not rendered.
    #: At most `MAX_IGNORED_FIELDS` names, escaped and cut (`_bound_ignored_fields`).
    ignored_fields: list[str] = Field(default_factory=list)
    #: How many unknown field names `ignored_fields` left out; absent when none.
    ignored_fields_dropped: int | None = None
    #: The SNS message id, when the message had no usable task id to correlate by.
    message_id: str | None = None
    #: How many image URLs the task had, when `image_url` lists only the first ones
    #: (the manifest lists them all); absent when `image_url` is complete.
    image_url_truncated: int | None = None
    #: The id a refused message named while another task held it (`id` is then null;
    #: docs/lifecycle.md, "Refused messages"); absent otherwise.
    named_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bound_ignored_fields(cls, data: Any) -> Any:
        # The names are the task's own keys: a body of 100 000 unknown keys, or keys of
        # control characters, must still give a callback that fits and prints cleanly.
        if not isinstance(data, dict) or not isinstance(data.get("ignored_fields"), list):
            return data
        names = data["ignored_fields"]
        kept = [
            escape(n, MAX_IGNORED_FIELD_CHARS) if isinstance(n, str) else n
            for n in names[:MAX_IGNORED_FIELDS]
        ]
        dropped = len(names) - len(kept) + (data.get("ignored_fields_dropped") or 0)
        return {**data, "ignored_fields": kept, "ignored_fields_dropped": dropped or None}

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in _OMITTED_WHEN_UNSET:
            if out.get(name) is None:
                out.pop(name, None)
        return out

    @field_validator("context", "info")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        # Echoed input: a lone surrogate (valid JSON, not encodable) becomes U+FFFD,
        # so the callback always serialises (the task itself was refused for it).
        return scrub(value)

    @classmethod
    def for_task(cls, task: Task, status: TaskStatus, **fields: Any) -> Callback:
        """A callback about `task`: its id, runtime, tasktype and context, `result`
        mirroring success, and the other `fields` as given."""
        return cls(
            id=task.id,
            runtime=task.runtime,
            tasktype=task.tasktype.value,
            context=task.context,
            status=status,
            result=status is TaskStatus.SUCCEEDED,
            **fields,
        )

    def message_attributes(self) -> dict[str, dict[str, str]]:
        attributes = {"status": {"DataType": "String", "StringValue": self.status.value}}
        if self.runtime:
            attributes["runtime"] = {"DataType": "String", "StringValue": self.runtime}
        return attributes

    def sns_size(self) -> int:
        """UTF-8 bytes SNS counts against its limit: the body and every attribute."""
        return sns_message_size(self.model_dump_json(), self.message_attributes())

    def fitted(self, limit: int = MAX_SNS_MESSAGE_BYTES) -> Callback:
        """This callback, trimmed by one rule until it fits in one SNS message.

        `limit` is what the body and `message_attributes()` may take together; a
        publisher that adds attributes of its own (the signature, `sdeks.signing`)
        passes what is left for these.

        In order, each step only if still needed (the manifest at `output_url`
        keeps everything a step removes):

        0. always: `image_url` keeps at most `MAX_IMAGE_URL_BYTES` of URLs
           (`image_url_truncated` then says how many there were);
        1. `info` loses the keys that repeat the prompt (`BULKY_INFO_KEYS`);
        2. `info` is dropped;
        3. `ignored_fields` is emptied (`ignored_fields_dropped` counts the names);
        4. `context` is replaced by ``{"sdeks_context_truncated": {"bytes": N,
           "manifest": output_url}}``;
        5. `error.message` is cut to 1000 characters, then `image_url` and
           `seeds` are emptied.
        """
        out = self._urls_bounded()
        if out.sns_size() <= limit:
            return out
        steps = [
            lambda c: (
                c._with_info(
                    {k: v for k, v in c.info.items() if k not in BULKY_INFO_KEYS}
                    | {"truncated": f"too large for SNS; the full info is in {c.output_url}"}
                )
                if c.info
                else c
            ),
            lambda c: c._with_info(None),
            lambda c: (
                c.model_copy(
                    update={
                        "ignored_fields": [],
                        "ignored_fields_dropped": len(c.ignored_fields)
                        + (c.ignored_fields_dropped or 0),
                    }
                )
                if c.ignored_fields
                else c
            ),
            lambda c: (
                c.model_copy(update={"context": _context_marker(c.context, c.output_url)})
                if c.context is not None
                else c
            ),
            lambda c: c.model_copy(
                update={
                    "error": ErrorInfo(code=c.error.code, message=c.error.message[:1000])
                    if c.error
                    else None
                }
            ),
            lambda c: c.model_copy(
                update={
                    "image_url": [],
                    "seeds": [],
                    # How many there were: a count set by step 0 already says so.
                    "image_url_truncated": c.image_url_truncated or len(c.image_url) or None,
                }
            ),
        ]
        for step in steps:
            out = step(out)
            if out.sns_size() <= limit:
                return out
        raise ValueError(f"callback of task {self.id} cannot be made to fit in {limit} bytes")

    def _with_info(self, info: dict[str, Any] | None) -> Callback:
        return self.model_copy(update={"info": info})

    def _urls_bounded(self) -> Callback:
        total, kept = 0, 0
        for url in self.image_url:
            total += len(url.encode("utf-8")) + 4
            if total > MAX_IMAGE_URL_BYTES:
                break
            kept += 1
        if kept == len(self.image_url):
            return self
        return self.model_copy(
            update={"image_url": self.image_url[:kept], "image_url_truncated": len(self.image_url)}
        )

    def sns_publish_kwargs(
        self, topic_arn: str, *, limit: int = MAX_SNS_MESSAGE_BYTES
    ) -> dict[str, Any]:
        """Arguments for `sns.publish` (boto3 and aiobotocore alike), fitted to `limit`
        (less than SNS's when the caller adds attributes of its own)."""
        fitted = self.fitted(limit)
        return {
            "TopicArn": topic_arn,
            "Message": fitted.model_dump_json(),
            "MessageAttributes": fitted.message_attributes(),
        }


def sns_message_size(message: str, attributes: dict[str, dict[str, str]]) -> int:
    """What SNS counts against `MAX_SNS_MESSAGE_BYTES`: the body, and each attribute's
    name, data type and value, in UTF-8 bytes."""
    size = len(message.encode("utf-8"))
    for name, attr in attributes.items():
        size += len(name.encode("utf-8")) + len(attr.get("DataType", "").encode("utf-8"))
        size += len(str(attr.get("StringValue", "")).encode("utf-8"))
    return size


def _context_marker(context: Any, manifest_url: str | None) -> dict[str, Any]:
    size = len(json.dumps(context, separators=(",", ":")).encode("utf-8"))
    return {CONTEXT_MARKER: {"bytes": size, "manifest": manifest_url}}


class Manifest(BaseModel):
    """`{prefix}/{id}/{id}.json`, written beside the PNGs."""

    model_config = ConfigDict(extra="allow")

    id: str
    runtime: str
    tasktype: str
    status: TaskStatus
    model: str | None = None
    output_location: str
    images: list[str] = Field(default_factory=list)  # object keys
    seeds: list[int] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    info: dict[str, Any] | None = None
    timings: Timings = Field(default_factory=Timings)
    error: ErrorInfo | None = None
    context: Any = None
    #: `content` fields the task type does not know: not rendered (see the callback).
    ignored_fields: list[str] = Field(default_factory=list)

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2).encode()


def image_key(prefix: str, task_id: str, n: int) -> str:
    """Numbered from 1, deterministic, so a retry overwrites instead of duplicating."""
    if n < 1:
        raise ValueError(f"image numbers start at 1, got {n}")
    return f"{prefix}/{task_id}/{task_id}-{n}.png"


def manifest_key(prefix: str, task_id: str) -> str:
    return f"{prefix}/{task_id}/{task_id}.json"
