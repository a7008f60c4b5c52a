"""Resource names and wire constants shared by the CDK app and the local stack.

The CDK app (`infra/`) and the embedded local stack (`sdeks.local`) both build
their resources from `StackNames`, so a queue is called the same thing on a
laptop and in an account. Services never derive names themselves: they get
ARNs, URLs and bucket names from their settings (`SDEKS_*` variables), which
whoever deploys them fills in from these names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sdeks.bounds import excerpt

#: SNS message attribute that routes a task to its runtime queue.
RUNTIME_ATTRIBUTE = "runtime"

#: Receives before SQS moves a message to its DLQ (redrive policy).
MAX_RECEIVE_COUNT = 5
#: Message retention of every queue and DLQ (SQS's maximum, 14 days).
MESSAGE_RETENTION_S = 14 * 24 * 3600
#: Name prefix of the temporary callback queues `sdeks submit --wait` creates; the
#: stack's client policy grants SQS on exactly these.
CLI_QUEUE_PREFIX = "sdeks-cli-"
#: Queue visibility timeout; the dispatcher extends held messages well before it ends.
VISIBILITY_TIMEOUT_S = 60
#: Webhooks queue visibility timeout: one delivery with all its retries fits in it.
WEBHOOK_VISIBILITY_TIMEOUT_S = 120

#: Folders of the models bucket (A1111 names).
MODELS_CHECKPOINT_PREFIX = "Stable-diffusion/"
MODELS_LORA_PREFIX = "Lora/"
MODELS_VAE_PREFIX = "VAE/"
#: ControlNet models (A1111 `models/ControlNet/`); their annotator weights under `annotators/`.
MODELS_CONTROLNET_PREFIX = "ControlNet/"
MODELS_ANNOTATOR_PREFIX = "ControlNet/annotators/"
#: ADetailer detectors (A1111 `models/adetailer/`).
MODELS_DETECTOR_PREFIX = "adetailer/"

#: Key prefix in the output bucket where unparseable messages are kept for audit.
REJECTED_PREFIX = "rejected/"

# `fullmatch`, never `match` with `$`: `$` also matches before a final newline.
_RUNTIME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")


def is_runtime_name(name: object) -> bool:
    return isinstance(name, str) and _RUNTIME_RE.fullmatch(name) is not None


def check_runtime_name(name: str) -> str:
    """Runtime names become queue names and Kubernetes object names (DNS labels)."""
    if not is_runtime_name(name):
        raise ValueError(
            f"runtime name must be 1-40 lowercase letters, digits or '-', "
            f"starting and ending with a letter or digit, got {excerpt(name)}"
        )
    return name


@dataclass(frozen=True)
class StackNames:
    """Physical names of every shared resource, from one stack prefix."""

    prefix: str = "sdeks"

    @property
    def task_topic(self) -> str:
        return f"{self.prefix}-tasks"

    @property
    def callback_topic(self) -> str:
        return f"{self.prefix}-callbacks"

    @property
    def catch_all_queue(self) -> str:
        return f"{self.prefix}-catch-all"

    @property
    def catch_all_dlq(self) -> str:
        return f"{self.prefix}-catch-all-dlq"

    @property
    def webhook_queue(self) -> str:
        """Terminal callbacks, for the dispatcher to deliver to task webhooks."""
        return f"{self.prefix}-webhooks"

    @property
    def webhook_dlq(self) -> str:
        return f"{self.prefix}-webhooks-dlq"

    def task_queue(self, runtime: str) -> str:
        return f"{self.prefix}-{check_runtime_name(runtime)}-tasks"

    def task_dlq(self, runtime: str) -> str:
        return f"{self.prefix}-{check_runtime_name(runtime)}-dlq"

    @property
    def output_bucket(self) -> str:
        return f"{self.prefix}-outputs"

    @property
    def models_bucket(self) -> str:
        return f"{self.prefix}-models"

    @property
    def task_table(self) -> str:
        return f"{self.prefix}-tasks"


def stack_runtimes(names: StackNames, queue_names: Iterable[str]) -> list[str]:
    """The runtimes of stack `names` among `queue_names` (a `ListQueues` answer):
    exactly ``<prefix>-<runtime>-tasks`` with a valid runtime name, sorted.

    The prefix alone does not tell stacks apart: stack ``t1``'s ``t1-`` also
    starts stack ``t1-a``'s queues (``t1-a-sdruntime-tasks`` reads as runtime
    ``a-sdruntime``). Every stack has its catch-all queue, so a queue whose name
    also fits a longer stack whose catch-all is listed is that stack's.
    """
    listed = set(queue_names)
    head, tail = f"{names.prefix}-", "-tasks"
    found = []
    for name in listed:
        if not (name.startswith(head) and name.endswith(tail)):
            continue
        runtime = name[len(head) : -len(tail)]
        if not is_runtime_name(runtime) or names.task_queue(runtime) != name:
            continue
        parts = runtime.split("-")
        longer = (StackNames(f"{names.prefix}-{'-'.join(parts[:i])}") for i in range(1, len(parts)))
        if any(other.catch_all_queue in listed for other in longer):
            continue
        found.append(runtime)
    return sorted(found)


def runtime_filter_policy(runtime: str) -> dict[str, Any]:
    """SNS filter policy of a runtime queue's subscription."""
    return {RUNTIME_ATTRIBUTE: [check_runtime_name(runtime)]}


def catch_all_filter_policy(runtimes: list[str]) -> dict[str, Any]:
    """Everything that no runtime queue takes: no `runtime` attribute, or an unknown one.

    Conditions in one attribute's list are OR-ed by SNS, so nothing published
    is dropped for want of a matching subscription. `exists: false` comes
    first: SNS does not care about the order, and moto stops at the first
    rule that needs the attribute when it is absent.
    """
    known = [check_runtime_name(r) for r in runtimes]
    return {RUNTIME_ATTRIBUTE: [{"exists": False}, {"anything-but": known}]}
