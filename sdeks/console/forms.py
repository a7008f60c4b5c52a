"""The console's submit form: fields in, a canonical task envelope out.

The envelope is checked by `sdeks.envelope.parse_task`, as `sdeks submit`
checks a file, and published through `SdeksClient.publish`: the page has no
publishing path of its own. A bad field is refused here with its name, before
anything is published; what the form cannot judge (a model the pod cannot
load) fails the task with a callback like any other publisher's.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sdeks.envelope import Task, parse_task
from sdeks.errors import InvalidEnvelopeError

#: The id prefix of tasks submitted from the page, and their output key prefix.
CONSOLE_PREFIX = "console"
MAX_PROMPT_CHARS = 4000
#: Bounds of the form's numeric fields: (least, most). The runtime enforces its own
#: limits too; these keep a typo on the page from queueing a task that cannot fit.
BOUNDS: dict[str, tuple[int, int]] = {
    "width": (64, 2048),
    "height": (64, 2048),
    "steps": (1, 150),
    "batch_size": (1, 8),
    "seed": (-1, 2**32 - 1),
}
DEFAULTS: dict[str, Any] = {"width": 512, "height": 512, "steps": 20, "batch_size": 1, "seed": -1}


class FormError(ValueError):
    """A form field is missing or out of range; `field` names it for the page."""

    code = "invalid_form"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def to_error(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


def build_envelope(form: Mapping[str, Any], *, task_id: str | None = None) -> tuple[dict, Task]:
    """The envelope for `form` and its normalized task; raises `FormError`."""
    if not isinstance(form, Mapping):
        raise FormError("form", "the form must be a JSON object")
    runtime = _text(form, "runtime", required=True)
    model = _text(form, "model", required=False)
    prompt = _text(form, "prompt", required=False, limit=MAX_PROMPT_CHARS)
    negative = _text(form, "negative_prompt", required=False, limit=MAX_PROMPT_CHARS)
    numbers = {name: _integer(form, name) for name in BOUNDS}
    for side in ("width", "height"):
        if numbers[side] % 8:
            raise FormError(side, f"`{side}` must be a multiple of 8, got {numbers[side]}")

    content: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative, **numbers}
    if model:
        content["alwayson_scripts"] = {"sd_model_checkpoint": model}
    body = {
        "task": {
            "metadata": {
                "id": task_id or f"{CONSOLE_PREFIX}-{uuid.uuid4().hex[:12]}",
                "runtime": runtime,
                "tasktype": "text-to-image",
                "prefix": CONSOLE_PREFIX,
                "context": {"source": "sdeks console"},
            },
            "content": content,
        }
    }
    try:
        task = parse_task(body)
    except InvalidEnvelopeError as exc:
        raise FormError("form", exc.message) from exc
    return body, task


def _text(form: Mapping[str, Any], name: str, *, required: bool, limit: int = 200) -> str:
    value = form.get(name)
    if value is None or value == "":
        if required:
            raise FormError(name, f"`{name}` is required")
        return ""
    if not isinstance(value, str):
        raise FormError(name, f"`{name}` must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise FormError(name, f"`{name}` must be at most {limit} characters, got {len(value)}")
    return value


def _integer(form: Mapping[str, Any], name: str) -> int:
    value = form.get(name)
    if value is None or value == "":
        return int(DEFAULTS[name])
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise FormError(name, f"`{name}` must be a whole number, got {value!r:.40}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormError(name, f"`{name}` must be a whole number, got {value!r:.40}")
    least, most = BOUNDS[name]
    if not least <= value <= most:
        raise FormError(name, f"`{name}` must be between {least} and {most}, got {value}")
    return value
