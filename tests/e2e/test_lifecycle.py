"""Task lifecycle on the embedded stack: idempotency, cancel, status, timings, webhooks."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import urllib.request
import uuid

import pytest

from benchmarks._common import queue_depth
from sdeks import cli
from sdeks.local import LOCAL_CREDENTIALS
from sdeks.tasks import TaskTable
from sdeks.webhooks import verify_signature
from tests.e2e.test_pipeline import TIMEOUT_S, envelope, new_id, run


@pytest.fixture
def table(local) -> TaskTable:
    return TaskTable(local.client("dynamodb"), local.resources.task_table)


@pytest.fixture
def cli_env(local, monkeypatch):
    for key, value in {**local.exports(), **LOCAL_CREDENTIALS}.items():
        monkeypatch.setenv(key, value)


def rendered_jobs(local) -> float:
    """Jobs the pods have finished, from their Prometheus counters."""
    total = 0.0
    for pod in local.pods["sdruntime"]:
        request = urllib.request.Request(f"{pod.url}/metrics", headers=local.pod_headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("sdeks_runtime_jobs_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout_s: float = TIMEOUT_S, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")


def queue_drained(local) -> bool:
    return queue_depth(local.client("sqs"), local.resources.queues["sdruntime"]) == 0


def record(table: TaskTable, task_id: str):
    return asyncio.run(table.get(task_id))


def slow_envelope(task_id: str) -> dict:
    # Long enough on CPU to be caught queued or running: 16 images x 150 steps.
    return envelope(task_id, width=256, height=256, steps=150, batch_size=4, n_iter=4)


def test_republished_finished_task_is_not_rendered_or_called_back_again(local, client, table):
    task_id = new_id("idem")
    body = envelope(task_id)
    first = run(client, [body])[task_id]
    assert first.status == "succeeded"
    jobs_before = rendered_jobs(local)
    with client.listen([task_id]) as listener:
        client.publish(body, runtime="sdruntime")  # same id, published again
        # the dispatcher drops it on receipt: the table knows the id is finished
        wait_for(lambda: queue_drained(local), timeout_s=60)
        time.sleep(2)
        late = listener.poll(wait_s=1)
    assert late == []
    assert rendered_jobs(local) == jobs_before
    rec = record(table, task_id)
    assert rec.status == "succeeded"
    assert rec.seeds == first.seeds


def test_status_timings_and_progress_are_recorded(local, client, table):
    task_id = new_id("timed")
    callback = run(client, [envelope(task_id, steps=6)])[task_id]
    assert callback.status == "succeeded"
    t = callback.timings
    assert t.total_ms >= t.inference_ms > 0
    assert t.queued_ms >= 0 and t.upload_ms >= 0 and t.model_load_ms >= 0
    rec = record(table, task_id)
    assert rec.received_at <= rec.started_at <= rec.finished_at
    assert rec.queued_ms is not None and rec.execution_ms is not None
    assert rec.progress_done == rec.progress_total == 6
    assert rec.image_url == callback.image_url


def test_cancel_queued_and_running_tasks(local, client, table, cli_env, capsys):
    running_id, queued_id = new_id("run"), new_id("queued")
    with client.listen([running_id, queued_id]) as listener:
        client.publish(slow_envelope(running_id), runtime="sdruntime")
        wait_for(lambda: (r := record(table, running_id)) and (r.progress_done or 0) >= 1)
        client.publish(envelope(queued_id), runtime="sdruntime")
        wait_for(lambda: record(table, queued_id))
        assert record(table, queued_id).status == "queued"

        assert cli.main(["cancel", queued_id]) == cli.EXIT_OK
        assert cli.main(["cancel", running_id]) == cli.EXIT_OK
        out = capsys.readouterr().out
        assert "cancelled (it was still queued)" in out
        assert "cancel requested" in out

        results = listener.wait_terminal([running_id, queued_id], timeout_s=TIMEOUT_S)
        time.sleep(3)  # the queued message is still dispatched later: it must stay quiet
        extra = listener.poll(wait_s=1)
    assert results[queued_id].status == "cancelled"
    assert results[running_id].status == "cancelled"
    assert results[running_id].error.code == "cancelled"
    assert extra == []
    # the cancelled-while-queued task never rendered anything
    s3 = local.client("s3")
    listed = s3.list_objects_v2(Bucket=local.resources.output_bucket, Prefix=f"e2e/{queued_id}/")
    assert listed.get("KeyCount", 0) == 0


class Receiver:
    """A webhook receiver on 127.0.0.1 answering a scripted list of statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()


def test_webhook_is_signed_and_retried_after_server_errors(local, client, table):
    receiver = Receiver([500, 503])
    try:
        task_id = f"hook-{uuid.uuid4().hex[:8]}"
        body = envelope(task_id)
        body["task"]["metadata"]["webhook"] = receiver.url
        callback = run(client, [body])[task_id]
        assert callback.status == "succeeded"
        wait_for(lambda: len(receiver.requests) >= 3)
        wait_for(lambda: record(table, task_id).webhook_status is not None)
    finally:
        receiver.close()
    assert len(receiver.requests) == 3
    for headers, raw in receiver.requests:
        assert verify_signature(local.webhook_secret, headers, raw)
        assert not verify_signature("wrong-secret", headers, raw)
        assert json.loads(raw)["id"] == task_id
    delivered = json.loads(receiver.requests[-1][1])
    assert delivered["status"] == "succeeded"
    assert delivered["image_url"] == callback.image_url
    rec = record(table, task_id)
    assert rec.webhook_status == "delivered"
    assert rec.webhook_attempts == 3
