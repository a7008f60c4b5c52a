"""Errors that end a task, each with the stable `code` that goes into a failed
callback's `error.code`.

    SdeksError                      root; code "internal_error"
    ├── InvalidEnvelopeError        invalid_envelope: the message is not a task
    ├── InvalidParameterError       invalid_parameter: a content field is out of range
    ├── UnknownRuntimeError         unknown_runtime
    ├── ModelNotFoundError          model_not_found
    ├── ModelLoadError              model_load_failed
    ├── LinkError                   (base of the image-link refusals)
    │   ├── LinkForbiddenError      link_forbidden: scheme, address or bucket not allowed
    │   ├── LinkUnreachableError    link_unreachable: connect/HTTP/S3 failure or timeout
    │   ├── LinkTooLargeError       link_too_large
    │   └── NotAnImageError         not_an_image: undecodable, or over the pixel limit
    ├── OutOfMemoryError            out_of_memory
    ├── TaskCancelledError          cancelled
    ├── TaskTimeoutError            timeout
    └── TaskTableError              task_table_error: the task table refused or failed a call

The dispatcher adds `dispatch_failed` (`dispatcher.errors.DispatchFailedError`):
no pod completed the task within the queue's maxReceiveCount receives.

Services subclass these; every subclass keeps its parent's code unless it has
a reason to be more specific. Lower-layer exceptions (botocore, aiohttp,
torch) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import ClassVar


class SdeksError(Exception):
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, task_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.task_id = task_id

    def to_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidEnvelopeError(SdeksError):
    code = "invalid_envelope"


class InvalidParameterError(SdeksError):
    code = "invalid_parameter"


class UnknownRuntimeError(SdeksError):
    code = "unknown_runtime"


class ModelNotFoundError(SdeksError):
    code = "model_not_found"


class ModelLoadError(SdeksError):
    code = "model_load_failed"


class LinkError(SdeksError):
    code = "link_error"


class LinkForbiddenError(LinkError):
    code = "link_forbidden"


class LinkUnreachableError(LinkError):
    code = "link_unreachable"


class LinkTooLargeError(LinkError):
    code = "link_too_large"


class NotAnImageError(LinkError):
    code = "not_an_image"


class OutOfMemoryError(SdeksError):
    code = "out_of_memory"


class TaskCancelledError(SdeksError):
    code = "cancelled"


class TaskTimeoutError(SdeksError):
    code = "timeout"


class TaskTableError(SdeksError):
    """A task-table call failed for a reason other than a lost condition (throttling,
    a missing table or index). Lost conditions are results, never this error."""

    code = "task_table_error"
