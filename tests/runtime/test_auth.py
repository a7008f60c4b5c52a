"""The pod API's token (runtime/auth.py) and signed callbacks, on a real pod over moto."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sdeks.callback import Callback
from sdeks.signing import SIGNATURE_ATTRIBUTE, TIMESTAMP_ATTRIBUTE, verify_callback
from tests.runtime.conftest import pod_app

TOKEN = "pod-token-for-tests"
SECRET = "callback-secret-for-tests"


def _app(stack, aws, tiny_models_dir: Path, tmp_path: Path, **overrides):
    return pod_app(stack, aws, tiny_models_dir, tmp_path, pod_name="pod-auth", **overrides)


@pytest.fixture
def locked(stack, aws, tiny_models_dir: Path, tmp_path: Path):
    app = _app(stack, aws, tiny_models_dir, tmp_path, pod_token=TOKEN, callback_secret=SECRET)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def callback_queue(callbacks) -> str:
    """The callback queue's URL (raw delivery, so attributes arrive as SQS attributes)."""
    return callbacks.queue_url


def _job(task_id: str) -> dict:
    return {
        "task": {
            "id": task_id,
            "runtime": "sdruntime",
            "tasktype": "text-to-image",
            "prefix": "out/auth",
            "content": {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 7},
        },
        "model": "tiny-sd15",
    }


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_pod_refuses_a_job_without_the_token_and_renders_it_with(locked, aws, callback_queue):
    # GIVEN a pod with SDEKS_POD_TOKEN set
    # WHEN a job comes without the token, or with a wrong one
    for headers in ({}, _bearer("not-the-token"), {"Authorization": f"Basic {TOKEN}"}):
        refused = locked.post("/v1/jobs", json=_job("auth-refused"), headers=headers)
        # THEN it is refused before anything runs, and nothing is published
        assert refused.status_code == 401, headers
        assert refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
    assert "Messages" not in aws.sqs.receive_message(QueueUrl=callback_queue, WaitTimeSeconds=0)
    # WHEN it comes with the token THEN it renders and answers the callback
    answer = locked.post("/v1/jobs", json=_job("auth-ok"), headers=_bearer(TOKEN))
    assert answer.status_code == 200, answer.text
    assert Callback.model_validate(answer.json()).status == "succeeded"


def test_every_route_but_health_wants_the_token(locked) -> None:
    assert locked.get("/health").status_code == 200
    for method, path in (
        ("GET", "/v1/state"),
        ("GET", "/metrics"),
        ("GET", "/sdapi/v1/sd-models"),
        ("GET", "/sdapi/v1/options"),
        ("POST", "/sdapi/v1/txt2img"),
        ("GET", "/docs"),
        ("GET", "/no-such-route"),
    ):
        assert locked.request(method, path).status_code == 401, path
    assert locked.get("/v1/state", headers=_bearer(TOKEN)).status_code == 200
    assert locked.get("/metrics", headers=_bearer(TOKEN)).status_code == 200


def test_standalone_pod_without_a_token_is_open_and_says_so(
    stack, aws, tiny_models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.auth"):
        app = _app(stack, aws, tiny_models_dir, tmp_path)
    assert any("SDEKS_POD_TOKEN is not set" in r.getMessage() for r in caplog.records)
    with TestClient(app) as client:
        assert client.get("/v1/state").status_code == 200


def test_pod_callback_is_signed_and_a_changed_body_fails(locked, aws, callback_queue) -> None:
    # GIVEN a pod with a callback secret WHEN it renders a job
    assert locked.post("/v1/jobs", json=_job("auth-signed"), headers=_bearer(TOKEN)).is_success
    messages = aws.sqs.receive_message(
        QueueUrl=callback_queue, MessageAttributeNames=["All"], WaitTimeSeconds=1
    )["Messages"]
    (message,) = [m for m in messages if json.loads(m["Body"])["id"] == "auth-signed"]
    attributes = message["MessageAttributes"]
    assert attributes[SIGNATURE_ATTRIBUTE]["StringValue"].startswith("v1=")
    # THEN the subscriber's check passes with the secret, as delivered
    assert verify_callback(SECRET, message["Body"], attributes)
    # ... and fails for a changed body, another secret, or a stale one when asked
    forged = message["Body"].replace('"succeeded"', '"failed"', 1)
    assert forged != message["Body"]
    assert not verify_callback(SECRET, forged, attributes)
    assert not verify_callback("another-secret", message["Body"], attributes)
    signed_at = int(attributes[TIMESTAMP_ATTRIBUTE]["StringValue"])
    assert not verify_callback(
        SECRET, message["Body"], attributes, max_age_s=60, now=signed_at + 3600
    )
    assert not verify_callback(SECRET, message["Body"], {})
