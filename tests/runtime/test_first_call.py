"""First call (`sdeks.grace`): when a job ends, the pod holds itself a moment for
the dispatcher replica that sent it. The real pod app over moto, and the hold
itself on a stepped clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sdeks.grace import FirstCall, Reserved
from tests.runtime.conftest import pod_app
from tests.runtime.test_pod_job import job


@pytest.fixture
def pod(stack, aws, tiny_models_dir: Path, tmp_path: Path):
    # A long hold, so that none ends while the test renders on a loaded machine.
    app = pod_app(stack, aws, tiny_models_dir, tmp_path, first_call_s=5.0)
    with TestClient(app) as client:
        yield client


def _signed(task_id: str, replica: str | None, model: str | None = None) -> dict:
    body = job(task_id)
    body["replica"], body["model"] = replica, model
    return body


def test_pod_holds_first_call_for_the_replica_whose_job_ended(pod, callbacks):
    assert pod.get("/v1/state").json()["reserved"] is None
    assert pod.post("/v1/jobs", json=_signed("fc-1", "rep-a")).status_code == 200
    # THEN the state names the hold: rep-a, the model it rendered, the time left
    held = pod.get("/v1/state").json()["reserved"]
    assert held["replica"] == "rep-a" and held["model"] == "tiny-sd15"
    assert 0 < held["for_s"] <= 5.0
    # AND another replica's job that would switch the model is sent back, naming it
    refused = pod.post("/v1/jobs", json=_signed("fc-2", "rep-b", "another-model"))
    assert refused.status_code == 429
    assert refused.json()["code"] == "reserved"
    assert refused.json()["reserved"]["replica"] == "rep-a"
    assert "fc-2" not in {c.id for c in callbacks()}  # nothing published for it
    # AND one of the held model (the default's, here) switches nothing: admitted
    assert pod.post("/v1/jobs", json=_signed("fc-3", "rep-b")).status_code == 200
    assert pod.get("/v1/state").json()["reserved"]["replica"] == "rep-b"
    # AND a job naming no replica (an older dispatcher) is admitted as before
    assert pod.post("/v1/jobs", json=_signed("fc-4", None, "tiny-sd15")).status_code == 200
    metrics = pod.get("/metrics").text
    assert "sdeks_runtime_rejected_reserved_total 1.0" in metrics


@pytest.mark.parametrize("replica", ["", "a/../b", "x" * 65, "a b", 7])
def test_pod_refuses_a_job_whose_replica_id_is_not_an_id(pod, replica):
    response = pod.post("/v1/jobs", json=_signed("fc-bad", replica))
    assert response.status_code == 422
    assert "replica" in response.text


def test_first_call_expires_and_zero_turns_it_off():
    now = [0.0]
    hold = FirstCall(0.3, clock=lambda: now[0])
    hold.ended("a", "m.safetensors")
    assert hold.current() == Reserved("a", "m.safetensors", 0.3)
    assert hold.refuses("b", "other") == Reserved("a", "m.safetensors", 0.3)
    assert hold.refuses("b", "m [abcdef12]") is None  # the same model, named otherwise
    assert hold.refuses(None, "other") is None
    now[0] = 0.31
    assert hold.current() is None and hold.refuses("b", "other") is None
    # the holder's own next job ends the hold at once
    hold.ended("a", "m")
    assert hold.refuses("a", "x") is None and hold.current() is None
    off = FirstCall(0.0, clock=lambda: now[0])
    off.ended("a", "m")
    assert off.current() is None
    assert FirstCall(3600).grace_s == 5.0  # bounded
