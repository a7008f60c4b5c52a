"""What comes back: the callback published to the callback topic, the JSON
manifest stored beside the PNGs, and the output keys they point at."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdeks.envelope import Task
from sdeks.errors import SdeksError


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
    ignored_fields: list[str] = Field(default_factory=list)
    #: The SNS message id, when the message had no usable task id to correlate by.
    message_id: str | None = None

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

    def sns_publish_kwargs(self, topic_arn: str) -> dict[str, Any]:
        """Arguments for `sns.publish` (boto3 and aiobotocore alike)."""
        attributes = {"status": {"DataType": "String", "StringValue": self.status.value}}
        if self.runtime:
            attributes["runtime"] = {"DataType": "String", "StringValue": self.runtime}
        return {
            "TopicArn": topic_arn,
            "Message": self.model_dump_json(),
            "MessageAttributes": attributes,
        }


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
