"""Dispatcher-side errors.

    SdeksError (sdeks.errors)
    ├── DispatchFailedError      dispatch_failed: no pod completed the task within
    │                            the queue's maxReceiveCount receives
    └── PodError                 internal: one call to one pod did not complete
        ├── PodBusyError         the pod answered 429 (full): try elsewhere, no penalty
        ├── PodFailedError       connection error, timeout, 5xx, or the pod was
        │                        dropped: the callback was NOT published, retry
        ├── PodDuplicateError    409: the pod already runs this task (an earlier
        │                        attempt, another replica): come back later
        └── PodRejectedError     a 4xx other than 429/404/408: the pod refused the
                                 job itself; retrying elsewhere would not help

`PodError`s never reach a callback directly: the consumer turns them into a
retry, or, for `PodRejectedError`, into a failed callback carrying the pod's
own error code when it sent one.
"""

from __future__ import annotations

from sdeks.errors import SdeksError
from sdeks.grace import Reserved


class DispatchFailedError(SdeksError):
    code = "dispatch_failed"


class PodError(SdeksError):
    def __init__(self, message: str, *, pod: str, task_id: str | None = None) -> None:
        super().__init__(message, task_id=task_id)
        self.pod = pod


class PodBusyError(PodError):
    def __init__(
        self,
        message: str,
        *,
        pod: str,
        task_id: str | None = None,
        reserved: Reserved | None = None,
    ) -> None:
        super().__init__(message, pod=pod, task_id=task_id)
        #: Set when the pod holds first call for another replica (`sdeks.grace`):
        #: not full, only not ours to switch for a moment.
        self.reserved = reserved


class PodFailedError(PodError):
    pass


class PodDuplicateError(PodError):
    pass


class PodRejectedError(PodError):
    def __init__(
        self, message: str, *, pod: str, error_code: str, task_id: str | None = None
    ) -> None:
        super().__init__(message, pod=pod, task_id=task_id)
        # The pod's own error code is this error's code (it goes into the callback).
        self.code = error_code  # type: ignore[misc]
