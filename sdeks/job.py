"""The job the dispatcher sends to a runtime pod (`POST /v1/jobs`).

Links in `task.content` are already resolved to base64. The pod renders,
writes outputs, publishes the callback, and answers with that `Callback`
(HTTP 200 for succeeded and failed alike, the callback already published);
429 when it has no free slot; 409 when it already runs the task or the task
already ended (come back later: the task table settles it); any other status
means the callback was NOT published and the dispatcher must retry or report.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sdeks.envelope import Task
from sdeks.grace import REPLICA_PATTERN


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Task
    #: Checkpoint the dispatcher scheduled it for (None: the runtime's default).
    model: str | None = None
    #: 1 on first delivery; SQS ApproximateReceiveCount afterwards.
    attempt: int = Field(default=1, ge=1)
    #: When the task was published to SNS (epoch seconds), for `queued_ms`.
    published_at: float | None = None
    #: Time the dispatcher spent resolving links.
    download_ms: int = 0
    #: The dispatcher replica that sent it: when it ends, the pod holds first call for
    #: that replica a moment (`sdeks.grace`). None: an older dispatcher, no hold.
    replica: str | None = Field(default=None, pattern=REPLICA_PATTERN)
