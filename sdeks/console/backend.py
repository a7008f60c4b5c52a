"""What the console shows, read through injected boto3 clients.

    tasks(status, runtime)   recent tasks from the task table, newest first, with ETA
    task(id)                 one task: record, queue position, ETA, presigned image
                             URLs, infotexts, manifest and callback
    fleet()                  each runtime's queue (visible, in flight, DLQ) and the pods
                             the console can reach, with their models per tier
    models()                 checkpoints in the models bucket (for the submit form)
    submit(form)             publish the form's envelope (`SdeksClient.publish`)
    cancel(id)               `Reporter.cancel`, the path `sdeks cancel` takes

Every call is synchronous (the server runs one thread per request); the task
table's async API runs on a plain boto3 client through `asyncio.run`, as the
CLI does. Errors the page should show are `ConsoleError`s with a stable code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError
from botocore.exceptions import ClientError as BotoClientError

from sdeks import aws
from sdeks.callback import TaskStatus
from sdeks.client import SdeksClient
from sdeks.console.forms import build_envelope
from sdeks.envelope import check_task_id
from sdeks.errors import SdeksError
from sdeks.lifecycle import Reporter, describe, estimate_eta_s
from sdeks.names import MODELS_CHECKPOINT_PREFIX, StackNames, check_runtime_name, stack_runtimes
from sdeks.tasks import TaskRecord, TaskTable

log = logging.getLogger(__name__)

#: How long presigned image links stay valid (the page refreshes them on each view).
PRESIGN_EXPIRY_S = 3600
#: A manifest larger than this is not shown (it is the pipeline's own file; this is a guard).
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_LIST = 200
POD_TIMEOUT_S = 2.0
#: Pod states and mean durations are reused for this long: the page polls every second.
CACHE_S = 1.0
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class ConsoleError(Exception):
    """A request the console cannot serve; `status` is the HTTP status to answer."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status

    def to_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class QueuePair:
    runtime: str
    url: str
    dlq_url: str | None = None


@dataclass
class ConsoleConfig:
    """Where the stack's resources are. Unset names come from `names` (the stack prefix);
    unset queues are found by name in the account (``<prefix>-<runtime>-tasks``)."""

    names: StackNames = field(default_factory=StackNames)
    task_table: str | None = None
    output_bucket: str | None = None
    models_bucket: str | None = None
    task_topic_arn: str | None = None
    callback_topic_arn: str | None = None
    queues: list[QueuePair] | None = None
    #: Runtimes whose queues to show, found by name (``sqs:GetQueueUrl``); None: list the
    #: account's queues (``sqs:ListQueues``) for ``<prefix>-<runtime>-tasks``.
    runtimes: list[str] | None = None
    catch_all: QueuePair | None = None
    #: runtime -> pod base URLs the console may ask for `/v1/state` (where reachable).
    pods: dict[str, list[str]] = field(default_factory=dict)
    #: Sent as ``Authorization: Bearer`` to pods that require a token.
    pod_token: str | None = None
    #: No submit form, no cancel button: for credentials that can only read.
    read_only: bool = False


class Console:
    def __init__(
        self,
        config: ConsoleConfig,
        *,
        sns: Any | None = None,
        sqs: Any | None = None,
        s3: Any | None = None,
        dynamodb: Any | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        names = config.names
        self.sqs = sqs or aws.client("sqs")
        # SigV4 presigned links: SigV2 ones are refused in the regions opened since 2014.
        self.s3 = s3 or aws.client("s3", signature_version="s3v4")
        self.client = SdeksClient(
            sns=sns or aws.client("sns"),
            sqs=self.sqs,
            s3=self.s3,
            task_topic_arn=config.task_topic_arn,
            callback_topic_arn=config.callback_topic_arn,
            names=names,
        )
        self.table = TaskTable(
            dynamodb or aws.client("dynamodb"), config.task_table or names.task_table
        )
        self.output_bucket = config.output_bucket or names.output_bucket
        self.models_bucket = config.models_bucket or names.models_bucket
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="console-pods")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- tasks ------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "stack": self.config.names.prefix,
            "runtimes": [q.runtime for q in self.queue_pairs()],
            "statuses": [s.value for s in TaskStatus],
            "read_only": self.config.read_only,
            "output_bucket": self.output_bucket,
            "task_table": self.table.table_name,
        }

    def tasks(
        self, status: str | None = None, runtime: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recent tasks, newest first; `runtime` filters after the read."""
        wanted = _status(status)
        if runtime:
            _runtime(runtime)
        limit = max(1, min(limit, MAX_LIST))
        # The table is indexed by status, not runtime: read more to fill a filtered page.
        fetch = min(MAX_LIST, limit * 4) if runtime else limit
        records = _run(self.table.list_recent(wanted, limit=fetch))
        if runtime:
            records = [r for r in records if r.runtime == runtime]
        records = records[:limit]
        now_ms = int(self._clock() * 1000)
        running = self._running_jobs()
        out = []
        for record in records:
            ahead = None
            if record.status is TaskStatus.QUEUED:
                # Within the page: queued tasks of the same runtime received earlier.
                ahead = sum(
                    1
                    for r in records
                    if r.status is TaskStatus.QUEUED
                    and r.runtime == record.runtime
                    and (r.received_at or 0) < (record.received_at or 0)
                )
            out.append(self._summary(record, now_ms, ahead=ahead, job=running.get(record.id)))
        return out

    def task(self, task_id: str) -> dict[str, Any]:
        _task_id(task_id)
        view = _run(describe(self.table, task_id, workers=self._workers_hint(None)))
        if view is None:
            raise ConsoleError(
                "not_found", f"no task {task_id!r} (unknown, or expired)", status=404
            )
        record = view.record
        now_ms = int(self._clock() * 1000)
        summary = self._summary(record, now_ms, job=self._running_jobs().get(record.id))
        if view.eta_s is not None and not record.status.terminal:
            summary["eta_s"] = round(view.eta_s, 1)
        summary["queue_position"] = (
            view.queue_position + 1 if view.queue_position is not None else None
        )
        manifest = self._manifest(record)
        infotexts = ((manifest or {}).get("info") or {}).get("infotexts") or []
        images = []
        for n, url in enumerate(record.image_url):
            images.append(
                {
                    "s3": url,
                    "url": self._presign(url),
                    "infotext": infotexts[n] if n < len(infotexts) else None,
                }
            )
        callback = json.loads(record.callback) if record.callback else None
        return {
            **summary,
            "record": record.model_dump(mode="json", exclude={"callback"}),
            "images": images,
            "manifest": manifest,
            "callback": callback,
        }

    def _summary(
        self,
        record: TaskRecord,
        now_ms: int,
        *,
        ahead: int | None = None,
        job: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        eta = None
        if not record.status.terminal:
            mean_ms = self._mean_ms(record.runtime)
            eta = estimate_eta_s(
                record,
                ahead=ahead or 0,
                mean_ms=mean_ms,
                workers=self._workers_hint(record.runtime),
                now_ms=now_ms,
            )
        progress = None
        if record.progress_total:
            progress = {"done": record.progress_done or 0, "total": record.progress_total}
        if job and progress is not None and not record.status.terminal:
            # The pod knows which image of the batch it is on; the table only steps.
            progress.update(
                {
                    "image": min(int(job.get("job_no", 0)) + 1, int(job.get("job_count", 1))),
                    "images": int(job.get("job_count", 1)),
                    "step": int(job.get("step", 0)),
                    "steps": int(job.get("steps", 0)),
                }
            )
        return {
            "id": record.id,
            "status": record.status.value,
            "cancel_requested": record.cancel_requested,
            "runtime": record.runtime,
            "tasktype": record.tasktype,
            "model": record.model,
            "pod": record.pod,
            "attempts": record.attempts,
            "received_at": record.received_at,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "queued_ms": record.queued_ms,
            "execution_ms": record.execution_ms,
            "progress": progress,
            "eta_s": None if eta is None else round(eta, 1),
            "timings": record.timings.model_dump() if record.timings else None,
            "error": record.error.model_dump() if record.error else None,
            "images": len(record.image_url),
            "output_location": record.output_location,
        }

    def _manifest(self, record: TaskRecord) -> dict[str, Any] | None:
        if not record.output_url:
            return None
        try:
            bucket, key = aws.parse_s3_url(record.output_url)
            answer = self.s3.get_object(Bucket=bucket, Key=key)
            if int(answer.get("ContentLength", 0)) > MAX_MANIFEST_BYTES:
                return {"note": f"manifest larger than {MAX_MANIFEST_BYTES} bytes: not shown"}
            document = json.loads(answer["Body"].read())
        except (BotoClientError, BotoCoreError, ValueError) as exc:
            log.info("task %s: manifest not readable: %s", record.id, exc)
            return None
        return document if isinstance(document, dict) else None

    def _presign(self, url: str) -> str | None:
        try:
            bucket, key = aws.parse_s3_url(url)
            link: str = self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRY_S
            )
            return link
        except (BotoClientError, BotoCoreError, ValueError) as exc:
            log.info("cannot presign %s: %s", url, exc)
            return None

    def _mean_ms(self, runtime: str | None) -> float | None:
        def compute() -> float | None:
            durations = _run(self.table.recent_durations_ms(runtime))
            return sum(durations) / len(durations) if durations else None

        value: float | None = self._cached(f"mean:{runtime}", compute, ttl_s=5 * CACHE_S)
        return value

    def _workers_hint(self, runtime: str | None) -> int:
        if runtime is None:
            return 1
        return max(1, len(self.config.pods.get(runtime, [])))

    # --- actions ------------------------------------------------------------------

    def submit(self, form: Mapping[str, Any]) -> dict[str, Any]:
        self._writable()
        body, task = build_envelope(form)
        known = {q.runtime for q in self.queue_pairs()}
        if known and task.runtime not in known:
            raise ConsoleError(
                "unknown_runtime",
                f"runtime {task.runtime!r} has no queue in this stack (known: {sorted(known)})",
            )
        message_id = self.client.publish(body, runtime=task.runtime)
        log.info("task %s: published from the console (message %s)", task.id, message_id)
        return {"id": task.id, "message_id": message_id, "envelope": body}

    def cancel(self, task_id: str) -> dict[str, Any]:
        self._writable()
        _task_id(task_id)
        reporter = Reporter(self.client.sns, self.client.callback_topic_arn, table=self.table)
        outcome = _run(reporter.cancel(task_id))
        return {"id": task_id, "outcome": outcome.value}

    def _writable(self) -> None:
        if self.config.read_only:
            raise ConsoleError("read_only", "the console runs read-only (--read-only)", status=403)

    # --- fleet ----------------------------------------------------------------------

    def queue_pairs(self) -> list[QueuePair]:
        if self.config.queues is not None:
            return list(self.config.queues)
        find = self._named_queues if self.config.runtimes is not None else self._discover_queues
        pairs: list[QueuePair] = self._cached("queues", find, ttl_s=30.0)
        return pairs

    def _named_queues(self) -> list[QueuePair]:
        names = self.config.names
        pairs = []
        for runtime in self.config.runtimes or []:
            url = _queue_url(self.sqs, names.task_queue(runtime))
            if url is None:
                raise ConsoleError(
                    "unknown_runtime", f"no queue {names.task_queue(runtime)!r}", status=502
                )
            pairs.append(QueuePair(runtime, url, _queue_url(self.sqs, names.task_dlq(runtime))))
        return pairs

    def _discover_queues(self) -> list[QueuePair]:
        """``<prefix>-<runtime>-tasks`` queues with their ``-dlq``, found by name."""
        names = self.config.names
        urls = _list_queues(self.sqs, f"{names.prefix}-")
        by_name = {url.rsplit("/", 1)[-1]: url for url in urls}
        return [
            QueuePair(
                runtime, by_name[names.task_queue(runtime)], by_name.get(names.task_dlq(runtime))
            )
            for runtime in stack_runtimes(names, by_name)
        ]

    def fleet(self) -> dict[str, Any]:
        queues = [self._queue_view(q) for q in self.queue_pairs()]
        catch_all = self.config.catch_all
        if catch_all is None:
            names = self.config.names
            urls = {u.rsplit("/", 1)[-1]: u for u in _list_queues(self.sqs, names.catch_all_queue)}
            if names.catch_all_queue in urls:
                catch_all = QueuePair(
                    "(catch-all)", urls[names.catch_all_queue], urls.get(names.catch_all_dlq)
                )
        return {
            "queues": queues,
            "catch_all": self._queue_view(catch_all) if catch_all else None,
            "pods": self._pod_states(),
        }

    def _queue_view(self, pair: QueuePair) -> dict[str, Any]:
        view: dict[str, Any] = {"runtime": pair.runtime, "queue": pair.url.rsplit("/", 1)[-1]}
        try:
            attributes = self.sqs.get_queue_attributes(
                QueueUrl=pair.url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
            view["visible"] = int(attributes.get("ApproximateNumberOfMessages", 0))
            view["in_flight"] = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
            if pair.dlq_url:
                dlq = self.sqs.get_queue_attributes(
                    QueueUrl=pair.dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
                )["Attributes"]
                view["dlq"] = int(dlq.get("ApproximateNumberOfMessages", 0))
        except (BotoClientError, BotoCoreError) as exc:
            view["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return view

    def _pod_states(self) -> dict[str, list[dict[str, Any]]]:
        states: dict[str, list[dict[str, Any]]] = self._cached(
            "pods", self._fetch_pod_states, ttl_s=CACHE_S
        )
        return states

    def _fetch_pod_states(self) -> dict[str, list[dict[str, Any]]]:
        wanted = [(rt, url) for rt, urls in self.config.pods.items() for url in urls]
        answers = list(self._pool.map(lambda pair: self._pod_state(pair[1]), wanted))
        out: dict[str, list[dict[str, Any]]] = {rt: [] for rt in self.config.pods}
        for (runtime, _), answer in zip(wanted, answers, strict=True):
            out[runtime].append(answer)
        return out

    def _pod_state(self, url: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{url.rstrip('/')}/v1/state")
        if self.config.pod_token:
            request.add_header("Authorization", f"Bearer {self.config.pod_token}")
        try:
            with urllib.request.urlopen(request, timeout=POD_TIMEOUT_S) as response:
                state = json.loads(response.read(1024 * 1024))
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
            if exc.code in (401, 403):
                error += ": the pod wants its token (SDEKS_POD_TOKEN)"
            return {"url": url, "reachable": False, "error": error}
        except (OSError, ValueError) as exc:
            return {"url": url, "reachable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"url": url, "reachable": True, "state": state}

    def _running_jobs(self) -> dict[str, dict[str, Any]]:
        jobs: dict[str, dict[str, Any]] = {}
        for pods in self._pod_states().values():
            for pod in pods:
                for job in (pod.get("state") or {}).get("running") or []:
                    if isinstance(job, dict) and isinstance(job.get("id"), str):
                        jobs[job["id"]] = job
        return jobs

    # --- models -----------------------------------------------------------------------

    def models(self) -> list[str]:
        value: list[str] = self._cached("models", self._list_models, ttl_s=30.0)
        return value

    def _list_models(self) -> list[str]:
        """Diffusers folders and single files under ``Stable-diffusion/``, A1111 names."""
        found: set[str] = set()
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(
                Bucket=self.models_bucket, Prefix=MODELS_CHECKPOINT_PREFIX, Delimiter="/"
            )
            for page in pages:
                for folder in page.get("CommonPrefixes", []):
                    found.add(folder["Prefix"].removeprefix(MODELS_CHECKPOINT_PREFIX).rstrip("/"))
                for obj in page.get("Contents", []):
                    name = obj["Key"].removeprefix(MODELS_CHECKPOINT_PREFIX)
                    if name.endswith(_CHECKPOINT_SUFFIXES):
                        found.add(name)
        except (BotoClientError, BotoCoreError) as exc:
            raise ConsoleError(
                "models_unavailable",
                f"cannot list s3://{self.models_bucket}/{MODELS_CHECKPOINT_PREFIX}: {exc}",
                status=502,
            ) from exc
        return sorted(found)

    # --- internals --------------------------------------------------------------------

    def _cached(self, key: str, compute: Callable[[], Any], *, ttl_s: float) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < ttl_s:
                return hit[1]
        value = compute()
        with self._lock:
            self._cache[key] = (now, value)
        return value


def _list_queues(sqs: Any, prefix: str) -> list[str]:
    urls: list[str] = []
    kwargs: dict[str, Any] = {"QueueNamePrefix": prefix, "MaxResults": 1000}
    while True:
        answer = sqs.list_queues(**kwargs)
        urls.extend(answer.get("QueueUrls", []))
        token = answer.get("NextToken")
        if not token:
            return urls
        kwargs["NextToken"] = token


def _queue_url(sqs: Any, name: str) -> str | None:
    try:
        url: str = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        return url
    except BotoClientError as exc:
        if "NonExistentQueue" in str(exc.response.get("Error", {}).get("Code", "")):
            return None
        raise


def _run(coroutine: Any) -> Any:
    try:
        return asyncio.run(coroutine)
    except SdeksError as exc:
        raise ConsoleError(exc.code, exc.message, status=502) from exc


def _status(value: str | None) -> TaskStatus | None:
    if not value:
        return None
    try:
        return TaskStatus(value)
    except ValueError:
        allowed = ", ".join(s.value for s in TaskStatus)
        raise ConsoleError(
            "invalid_status", f"status must be one of {allowed}, got {value!r:.40}"
        ) from None


def _runtime(value: str) -> None:
    try:
        check_runtime_name(value)
    except ValueError as exc:
        raise ConsoleError("invalid_runtime", str(exc)) from None


def _task_id(value: str) -> None:
    try:
        check_task_id(value)
    except ValueError as exc:
        raise ConsoleError("invalid_id", str(exc)) from None
