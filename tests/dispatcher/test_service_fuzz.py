"""Whatever arrives, each message ends in exactly one outcome: a job, a
forward, or one failed callback; never silence, never a crash of the loop.

The consumer runs against in-memory stand-ins for SQS, SNS, S3, the router and
the link resolver, so hypothesis can throw hundreds of bodies at it quickly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.leases import LeaseKeeper
from dispatcher.links import ResolvedContent
from dispatcher.metrics import Metrics
from dispatcher.queues import Source
from dispatcher.service import Dispatcher
from dispatcher.settings import DispatcherSettings
from sdeks.callback import Callback, TaskStatus

RUNTIME_QUEUE = "https://sqs.test/q-sdruntime"
CATCH_ALL = "https://sqs.test/q-catch-all"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str):
        async def record(**kwargs: Any) -> dict[str, Any]:
            self.calls.append((name, kwargs))
            return {}

        return record

    def named(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for n, kwargs in self.calls if n == name]


class PassLinks:
    async def resolve_content(self, content: dict[str, Any]) -> ResolvedContent:
        return ResolvedContent(content=content)


class InstantRouter:
    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def check_open(self) -> None:
        pass

    async def run_job(self, job: Any, **_: Any) -> Callback:
        self.jobs.append(job)
        return Callback(id=job.task.id, status=TaskStatus.SUCCEEDED, result=True)


def make_dispatcher() -> tuple[Dispatcher, Recorder, Recorder, InstantRouter]:
    sqs, sns, s3 = Recorder(), Recorder(), Recorder()
    router = InstantRouter()
    settings = DispatcherSettings(
        callback_topic_arn="arn:aws:sns:us-east-1:1:cb",
        output_bucket="out",
        queues={"sdruntime": RUNTIME_QUEUE},
        catch_all_queue_url=CATCH_ALL,
        pods={"sdruntime": []},
        metrics_port=0,
    )
    dispatcher = Dispatcher(
        settings,
        sqs=sqs,
        sns=sns,
        s3=s3,
        links=PassLinks(),  # type: ignore[arg-type]
        router=router,  # type: ignore[arg-type]
        leases=LeaseKeeper(sqs, extension_s=60, interval_s=20, delete_delay_s=0),
        metrics=Metrics(),
        sources=[],
    )
    return dispatcher, sqs, sns, router


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
ids = st.one_of(st.sampled_from(["ok-1", "a.b_c-9"]), st.text(max_size=12))
runtimes = st.sampled_from(["sdruntime", "other", "BAD RUNTIME", ""])
tasktypes = st.sampled_from(["text-to-image", "image-to-image", "nope"])
prefixes = st.sampled_from(["output", "a/b", "../x", "/abs", "rejected/x", ""])
envelopes = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {"id": ids, "runtime": runtimes, "tasktype": tasktypes, "prefix": prefixes},
            optional={"context": json_values},
        ),
        "content": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    }
)
documents = st.one_of(
    envelopes,
    envelopes.map(lambda e: {"task": e}),
    json_values,
    st.fixed_dictionaries(
        {
            "input": st.fixed_dictionaries(
                {
                    "api": st.fixed_dictionaries(
                        {
                            "method": st.just("POST"),
                            "endpoint": st.sampled_from(["/sdapi/v1/txt2img", "/nope"]),
                        }
                    ),
                    "payload": st.dictionaries(st.text(max_size=5), json_values, max_size=2),
                }
            )
        }
    ),
)
bodies = st.one_of(documents.map(json.dumps), st.text(max_size=50), st.just(""))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    attribute=st.one_of(st.none(), runtimes),
    wrapped=st.booleans(),
    catch_all=st.booleans(),
)
def test_every_message_has_exactly_one_outcome(body, attribute, wrapped, catch_all):
    dispatcher, sqs, sns, router = make_dispatcher()
    if wrapped:
        notification: dict[str, Any] = {
            "Type": "Notification",
            "MessageId": "0f4c3b3c-0000-4000-8000-000000000001",
            "Message": body,
            "Timestamp": "2026-11-21T06:00:00.000Z",
        }
        if attribute is not None:
            notification["MessageAttributes"] = {"runtime": {"Type": "String", "Value": attribute}}
        sqs_body = json.dumps(notification)
    else:
        sqs_body = body
    source = Source(
        CATCH_ALL if catch_all else RUNTIME_QUEUE, None if catch_all else "sdruntime", 5
    )
    message = {
        "MessageId": "m-1",
        "ReceiptHandle": "rh-1",
        "Body": sqs_body,
        "Attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1763700000000"},
    }

    asyncio.run(dispatcher._handle(source, message))

    published = sns.named("publish")
    forwarded = sqs.named("send_message")
    deleted = sqs.named("delete_message_batch")
    outcomes = len(published) + len(forwarded) + len(router.jobs)
    assert outcomes == 1, (published, forwarded, router.jobs)
    assert len(deleted) == 1  # and the message is gone only after that outcome
    for kwargs in published:
        callback = json.loads(kwargs["Message"])
        assert callback["status"] == "failed" and callback["error"]["code"]
    if router.jobs:
        assert not catch_all and router.jobs[0].task.runtime == "sdruntime"
