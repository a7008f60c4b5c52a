"""The client side: publish tasks, listen for their callbacks, fetch their outputs.

Works against whatever `AWS_ENDPOINT_URL` and credentials point at: the
embedded local stack or a real account. Topics are found by ARN
(`SDEKS_TASK_TOPIC_ARN`, `SDEKS_CALLBACK_TOPIC_ARN`) or, failing that, by the
stack's names (`sdeks.names.StackNames`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sdeks import aws
from sdeks.callback import Callback
from sdeks.envelope import Task, parse_task
from sdeks.errors import InvalidEnvelopeError
from sdeks.names import CLI_QUEUE_PREFIX, RUNTIME_ATTRIBUTE, StackNames, stack_runtimes

log = logging.getLogger(__name__)


class ClientError(Exception):
    """A client-side problem: topic not found, bad file, timeout."""


def find_topic_arn(sns: Any, name: str) -> str:
    paginator = sns.get_paginator("list_topics")
    for page in paginator.paginate():
        for topic in page.get("Topics", []):
            if topic["TopicArn"].rsplit(":", 1)[-1] == name:
                return topic["TopicArn"]
    raise ClientError(f"no SNS topic named {name!r}: is the stack deployed (or `sdeks local up`)?")


class SdeksClient:
    def __init__(
        self,
        *,
        sns: Any | None = None,
        sqs: Any | None = None,
        s3: Any | None = None,
        task_topic_arn: str | None = None,
        callback_topic_arn: str | None = None,
        names: StackNames | None = None,
    ) -> None:
        self.sns = sns or aws.client("sns")
        self.sqs = sqs or aws.client("sqs")
        self.s3 = s3 or aws.client("s3")
        self._names = names or StackNames(os.environ.get("SDEKS_STACK", "sdeks"))
        self._task_topic_arn = task_topic_arn or os.environ.get("SDEKS_TASK_TOPIC_ARN")
        self._callback_topic_arn = callback_topic_arn or os.environ.get("SDEKS_CALLBACK_TOPIC_ARN")

    @property
    def task_topic_arn(self) -> str:
        if not self._task_topic_arn:
            self._task_topic_arn = find_topic_arn(self.sns, self._names.task_topic)
        return self._task_topic_arn

    @property
    def callback_topic_arn(self) -> str:
        if not self._callback_topic_arn:
            self._callback_topic_arn = find_topic_arn(self.sns, self._names.callback_topic)
        return self._callback_topic_arn

    def publish(
        self, body: Mapping[str, Any] | str, *, runtime: str | None = None, attribute: bool = True
    ) -> str:
        """Publish a task body as is; sets the `runtime` attribute unless told not to.

        Returns the SNS message id.
        """
        message = body if isinstance(body, str) else json.dumps(body)
        kwargs: dict[str, Any] = {"TopicArn": self.task_topic_arn, "Message": message}
        if attribute and runtime:
            kwargs["MessageAttributes"] = {
                RUNTIME_ATTRIBUTE: {"DataType": "String", "StringValue": runtime}
            }
        return self.sns.publish(**kwargs)["MessageId"]

    def runtimes(self) -> list[str]:
        """The runtimes the stack serves, from its task queues' names
        (`sdeks.names.stack_runtimes`: this stack's exactly, not a longer prefix's)."""
        kwargs: dict[str, Any] = {"QueueNamePrefix": f"{self._names.prefix}-", "MaxResults": 1000}
        names: list[str] = []
        while True:
            answer = self.sqs.list_queues(**kwargs)
            names += [url.rsplit("/", 1)[-1] for url in answer.get("QueueUrls", [])]
            if not answer.get("NextToken"):
                return stack_runtimes(self._names, names)
            kwargs["NextToken"] = answer["NextToken"]

    def listen(self, task_ids: Iterable[str] | None = None) -> CallbackListener:
        return CallbackListener(self.sns, self.sqs, self.callback_topic_arn, task_ids)

    def download(self, callback: Callback, out_dir: Path) -> list[Path]:
        """Download a callback's PNGs into `out_dir/<id>/`; returns the local paths."""
        paths = []
        target = out_dir / str(callback.id)
        target.mkdir(parents=True, exist_ok=True)
        for url in callback.image_url:
            bucket, key = aws.parse_s3_url(url)
            path = target / Path(key).name
            self.s3.download_file(bucket, key, str(path))
            paths.append(path)
        return paths


def topic_delivery_policy(queue_arn: str, topic_arn: str) -> dict[str, Any]:
    """The SQS queue policy that lets the topic (and only it) deliver into the queue:
    real SNS delivers nothing to a queue without one (moto does not check)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }
        ],
    }


class CallbackListener:
    """A temporary SQS queue subscribed to the callback topic.

    Subscribe before publishing, so no callback can slip past. With `task_ids`,
    the subscription filters on the callback body's `id`.
    """

    def __init__(
        self, sns: Any, sqs: Any, topic_arn: str, task_ids: Iterable[str] | None = None
    ) -> None:
        self.sns, self.sqs, self.topic_arn = sns, sqs, topic_arn
        self.task_ids = sorted(set(task_ids)) if task_ids is not None else None
        self.queue_url: str | None = None
        self.subscription_arn: str | None = None

    def __enter__(self) -> CallbackListener:
        name = f"{CLI_QUEUE_PREFIX}{uuid.uuid4().hex[:16]}"
        self.queue_url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        self.sqs.set_queue_attributes(
            QueueUrl=self.queue_url,
            Attributes={"Policy": json.dumps(topic_delivery_policy(queue_arn, self.topic_arn))},
        )
        attributes = {"RawMessageDelivery": "true"}
        if self.task_ids is not None:
            attributes["FilterPolicyScope"] = "MessageBody"
            attributes["FilterPolicy"] = json.dumps({"id": self.task_ids})
        self.subscription_arn = self.sns.subscribe(
            TopicArn=self.topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes=attributes,
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.subscription_arn:
            try:
                self.sns.unsubscribe(SubscriptionArn=self.subscription_arn)
            except Exception:  # best effort clean-up
                log.warning("could not unsubscribe %s", self.subscription_arn)
        if self.queue_url:
            try:
                self.sqs.delete_queue(QueueUrl=self.queue_url)
            except Exception:
                log.warning("could not delete queue %s", self.queue_url)

    def poll(self, wait_s: int = 1) -> list[Callback]:
        """Callbacks that arrived (deleted from the temporary queue as read)."""
        assert self.queue_url, "use CallbackListener as a context manager"
        got = self.sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s
        )
        callbacks = []
        for message in got.get("Messages", []):
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
            try:
                callbacks.append(Callback.model_validate_json(message["Body"]))
            except ValueError:
                log.warning("ignoring a malformed callback: %.200s", message["Body"])
        return callbacks

    def wait_terminal(
        self,
        task_ids: Iterable[str],
        timeout_s: float,
        *,
        on_event: Any = None,
    ) -> dict[str, Callback]:
        """Wait until every id has a terminal callback; returns them by id.

        `on_event(callback_or_None)` is called after each poll (progress display).
        Raises ClientError on timeout, naming the ids still missing.
        """
        wanted = set(task_ids)
        done: dict[str, Callback] = {}
        deadline = time.monotonic() + timeout_s
        while wanted - done.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(wanted - done.keys())
                raise ClientError(f"timed out after {timeout_s:.0f}s waiting for {missing}")
            events = self.poll(wait_s=max(0, min(1, int(remaining))))
            for callback in events:
                if callback.id in wanted and callback.status.terminal:
                    done.setdefault(callback.id, callback)
                if on_event:
                    on_event(callback)
            if not events and on_event:
                on_event(None)
        return done


def load_task_file(
    path: str | Path,
    *,
    runtime: str | None = None,
    default_runtime: Callable[[], str | None] | None = None,
) -> tuple[dict[str, Any], Task]:
    """Read a task file; returns the body as written and its normalized task.

    A body that carries no id (the serverless shape) gets a generated one, so
    its callback can be awaited. A shape that carries no runtime (legacy,
    serverless) takes `runtime`, else `default_runtime()` when it names one.
    """
    text = Path(path).read_text() if str(path) != "-" else sys.stdin.read()
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ClientError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(body, dict) and "input" in body and "id" not in body:
        body["id"] = f"task-{uuid.uuid4().hex[:12]}"
    try:
        return body, parse_task(body, runtime=runtime)
    except InvalidEnvelopeError as exc:
        if runtime is not None or not _names_runtime(exc.message):
            raise ClientError(f"{path}: {exc.message}") from exc
        fallback = default_runtime() if default_runtime else None
        if fallback is None:
            raise ClientError(
                f"{path}: {exc.message} (this shape carries no runtime: "
                "pass --runtime NAME, e.g. --runtime sdruntime)"
            ) from exc
    try:
        task = parse_task(body, runtime=fallback)
    except InvalidEnvelopeError as exc:
        raise ClientError(f"{path}: {exc.message}") from exc
    log.info("%s carries no runtime: using %s, the stack's only runtime", path, fallback)
    return body, task


def _names_runtime(message: str) -> bool:
    """The envelope error is about its missing runtime (the message names the field)."""
    return "runtime:" in message or "`runtime`" in message


def with_new_id(body: dict[str, Any], task: Task) -> tuple[dict[str, Any], Task]:
    """The same task under a fresh id (`<id>-<6 hex>`), set where its shape keeps the id."""
    new_id = f"{task.id[:120]}-{uuid.uuid4().hex[:6]}"
    body = json.loads(json.dumps(body))
    if "task" in body:
        body["task"]["metadata"]["id"] = new_id
    elif "metadata" in body:
        body["metadata"]["id"] = new_id
    elif "input" in body:
        body["id"] = new_id
    else:
        body["alwayson_scripts"]["id_task"] = new_id
    return body, task.model_copy(update={"id": new_id})
