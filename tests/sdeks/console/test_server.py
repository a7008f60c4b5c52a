"""The console's HTTP API and guards, on moto, through a real socket."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator

import pytest

from sdeks.callback import Callback, ErrorInfo, TaskStatus
from sdeks.console.backend import Console, ConsoleConfig
from sdeks.console.server import STATIC_FILES, ConsoleServer, static_file
from sdeks.envelope import parse_task
from sdeks.lifecycle import Reporter
from sdeks.names import MODELS_CHECKPOINT_PREFIX, StackNames
from sdeks.tasks import TaskTable
from tests.helpers import drain_callbacks


def a_task(task_id: str, runtime: str = "sdruntime"):
    return parse_task(
        {
            "metadata": {
                "id": task_id,
                "runtime": runtime,
                "tasktype": "text-to-image",
                "prefix": "p",
            },
            "content": {"steps": 4},
        }
    )


@pytest.fixture
def table(aws, stack) -> TaskTable:
    return TaskTable(aws.dynamodb, stack.task_table)


def make_server(aws, stack, **config) -> ConsoleServer:
    # Queues found by name, as against a deployed stack.
    names = StackNames(stack.task_table.removesuffix("-tasks"))
    console = Console(
        ConsoleConfig(names=names, **config),
        sns=aws.sns,
        sqs=aws.sqs,
        s3=aws.s3,
        dynamodb=aws.dynamodb,
    )
    return ConsoleServer(console, port=0).start()


@pytest.fixture
def server(aws, stack) -> Iterator[ConsoleServer]:
    server = make_server(aws, stack)
    yield server
    server.stop()


def request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    conn.request(method, path, body=data, headers=hdrs)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, (json.loads(raw) if kind == "application/json" else raw), response


def test_static_files_are_package_data_and_served(server):
    for name in STATIC_FILES:
        assert static_file(name)
    status, body, response = request(server, "GET", "/")
    assert status == 200 and b"/static/console.js" in body
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    status, body, response = request(server, "GET", "/static/console.js")
    assert status == 200 and response.getheader("Content-Type").startswith("text/javascript")
    # the page loads nothing from elsewhere: every src/href is local
    page = static_file("index.html").decode()
    assert "http://" not in page and "https://" not in page and "//" not in page.replace("<!--", "")
    assert request(server, "GET", "/static/../backend.py")[0] == 404


def test_info_discovers_the_runtime_queues_by_name(server):
    status, info, _ = request(server, "GET", "/api/info")
    assert status == 200
    assert info["runtimes"] == ["sdruntime"]
    assert info["read_only"] is False


def test_a_foreign_host_header_is_refused(server):
    status, body, _ = request(server, "GET", "/api/info", headers={"Host": "evil.example:80"})
    assert status == 421 and body["error"]["code"] == "bad_host"


def test_posts_need_json_and_the_same_origin(server, aws, stack):
    form = {"runtime": "sdruntime", "prompt": "x"}
    status, body, _ = request(
        server, "POST", "/api/tasks", form, headers={"Origin": "http://evil.example"}
    )
    assert status == 403 and body["error"]["code"] == "bad_origin"
    status, body, _ = request(
        server, "POST", "/api/tasks", form, headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    queue = stack.queues["sdruntime"]
    got = aws.sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0)
    assert got.get("Messages", []) == []  # nothing was published


def test_submit_publishes_the_envelope_to_the_runtime_queue(server, aws, stack):
    origin = {"Origin": f"http://127.0.0.1:{server.port}"}
    form = {"runtime": "sdruntime", "prompt": "a cat", "width": "64", "height": "64"}
    status, answer, _ = request(server, "POST", "/api/tasks", form, headers=origin)
    assert status == 202, answer
    got = aws.sqs.receive_message(
        QueueUrl=stack.queues["sdruntime"], WaitTimeSeconds=2, MessageAttributeNames=["All"]
    )
    (message,) = got["Messages"]
    published = json.loads(json.loads(message["Body"])["Message"])
    assert published["task"]["metadata"]["id"] == answer["id"]
    assert published["task"]["content"]["prompt"] == "a cat"


def test_submit_refuses_a_bad_field_or_an_unknown_runtime(server):
    status, body, _ = request(server, "POST", "/api/tasks", {"runtime": "sdruntime", "steps": "0"})
    assert status == 400
    assert body["error"] == {
        "code": "invalid_form",
        "field": "steps",
        "message": "`steps` must be between 1 and 150, got 0",
    }
    status, body, _ = request(server, "POST", "/api/tasks", {"runtime": "nosuch"})
    assert status == 400 and body["error"]["code"] == "unknown_runtime"


def test_tasks_newest_first_with_filters_and_errors(server, table, aws, stack):
    for task_id in ("old-one", "new-one"):
        asyncio.run(table.record_queued(a_task(task_id)))
    asyncio.run(table.record_queued(a_task("other-rt", runtime="second")))
    failed = Callback(
        id="old-one",
        runtime="sdruntime",
        status=TaskStatus.FAILED,
        error=ErrorInfo(code="model_not_found", message="no model 'x'"),
    )
    asyncio.run(Reporter(aws.sns, stack.callback_topic_arn, table=table).finish(failed))

    status, body, _ = request(server, "GET", "/api/tasks")
    ids = [t["id"] for t in body["tasks"]]
    assert ids.index("other-rt") < ids.index("new-one")  # newest first
    status, body, _ = request(server, "GET", "/api/tasks?status=failed")
    assert [(t["id"], t["error"]["code"]) for t in body["tasks"]] == [
        ("old-one", "model_not_found")
    ]
    status, body, _ = request(server, "GET", "/api/tasks?runtime=sdruntime")
    assert {t["id"] for t in body["tasks"]} == {"old-one", "new-one"}
    status, body, _ = request(server, "GET", "/api/tasks?status=bogus")
    assert status == 400 and body["error"]["code"] == "invalid_status"
    status, body, _ = request(server, "GET", "/api/tasks/..%2Fetc")
    assert status == 400 and body["error"]["code"] == "invalid_id"
    status, body, _ = request(server, "GET", "/api/tasks/never-seen")
    assert status == 404


def test_task_page_shows_presigned_images_infotext_manifest_and_callback(server, table, aws, stack):
    bucket = stack.output_bucket
    asyncio.run(table.record_queued(a_task("made-it")))
    aws.s3.put_object(Bucket=bucket, Key="p/made-it/made-it-1.png", Body=b"png")
    manifest = {"id": "made-it", "status": "succeeded", "info": {"infotexts": ["a cat\nSteps: 4"]}}
    aws.s3.put_object(Bucket=bucket, Key="p/made-it/made-it.json", Body=json.dumps(manifest))
    done = Callback(
        id="made-it",
        runtime="sdruntime",
        status=TaskStatus.SUCCEEDED,
        result=True,
        image_url=[f"s3://{bucket}/p/made-it/made-it-1.png"],
        output_url=f"s3://{bucket}/p/made-it/made-it.json",
    )
    asyncio.run(Reporter(aws.sns, stack.callback_topic_arn, table=table).finish(done))
    status, task, _ = request(server, "GET", "/api/tasks/made-it")
    assert status == 200
    (image,) = task["images"]
    assert image["infotext"] == "a cat\nSteps: 4"
    assert f"/{bucket}/p/made-it/made-it-1.png" in image["url"] and "Signature" in image["url"]
    assert task["manifest"] == manifest
    assert task["callback"]["status"] == "succeeded"


def test_cancel_a_queued_task_publishes_its_callback(server, table, aws, stack):
    asyncio.run(table.record_queued(a_task("to-stop")))
    from sdeks.client import CallbackListener

    with CallbackListener(aws.sns, aws.sqs, stack.callback_topic_arn, ["to-stop"]) as listener:
        status, body, _ = request(server, "POST", "/api/tasks/to-stop/cancel", {})
        assert status == 200 and body["outcome"] == "cancelled"
        callbacks = drain_callbacks(listener)
    assert [c.status for c in callbacks] == ["cancelled"]
    status, body, _ = request(server, "POST", "/api/tasks/to-stop/cancel", {})
    assert body["outcome"] == "already_finished"


def test_fleet_counts_queue_messages_and_reports_unreachable_pods(aws, stack):
    aws.sns.publish(
        TopicArn=stack.task_topic_arn,
        Message="{}",
        MessageAttributes={"runtime": {"DataType": "String", "StringValue": "sdruntime"}},
    )
    server = make_server(aws, stack, pods={"sdruntime": ["http://127.0.0.1:9"]})
    try:
        status, fleet, _ = request(server, "GET", "/api/fleet")
    finally:
        server.stop()
    (queue,) = fleet["queues"]
    assert queue["runtime"] == "sdruntime"
    assert queue["visible"] + queue["in_flight"] == 1 and queue["dlq"] == 0
    assert fleet["catch_all"]["visible"] == 0
    (pod,) = fleet["pods"]["sdruntime"]
    assert pod["reachable"] is False and pod["url"] == "http://127.0.0.1:9"


def test_models_lists_checkpoint_folders_and_files(server, aws, stack):
    bucket = stack.models_bucket
    for key in ("tiny/model_index.json", "tiny/unet/x.bin", "real.safetensors", "notes.txt"):
        aws.s3.put_object(Bucket=bucket, Key=MODELS_CHECKPOINT_PREFIX + key, Body=b"x")
    status, body, _ = request(server, "GET", "/api/models")
    assert body["models"] == ["real.safetensors", "tiny"]


def test_read_only_console_refuses_submit_and_cancel(aws, stack):
    server = make_server(aws, stack, read_only=True)
    try:
        assert request(server, "GET", "/api/info")[1]["read_only"] is True
        status, body, _ = request(server, "POST", "/api/tasks", {"runtime": "sdruntime"})
        assert status == 403 and body["error"]["code"] == "read_only"
        status, body, _ = request(server, "POST", "/api/tasks/x/cancel", {})
        assert status == 403
    finally:
        server.stop()


def test_named_runtimes_find_their_queues_without_listing(aws, stack):
    server = make_server(aws, stack, runtimes=["sdruntime"])
    try:
        status, fleet, _ = request(server, "GET", "/api/fleet")
        assert [q["queue"] for q in fleet["queues"]] == [stack.queues["sdruntime"].rsplit("/")[-1]]
        assert fleet["queues"][0]["dlq"] == 0
    finally:
        server.stop()
    server = make_server(aws, stack, runtimes=["absent"])
    try:
        status, body, _ = request(server, "GET", "/api/info")
        assert status == 502 and "absent" in body["error"]["message"]
    finally:
        server.stop()


class PodStub:
    """A pod's `/v1/state` on 127.0.0.1 that wants a bearer token, as runtime/auth.py does."""

    def __init__(self, token: str) -> None:
        import http.server
        import threading

        state = {
            "runtime": "sdruntime",
            "models": {"gpu": [], "ram": ["tiny"], "disk": ["tiny"]},
            "slots": 1,
            "free_slots": 1,
            "running": [],
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.headers.get("Authorization") == f"Bearer {token}"
                body = json.dumps(state if ok else {"error": {"code": "unauthorized"}}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("token", ["right", None])
def test_fleet_asks_pods_for_their_state_with_the_pod_token(aws, stack, token):
    pod = PodStub("right")
    server = make_server(aws, stack, pods={"sdruntime": [pod.url]}, pod_token=token)
    try:
        (answer,) = request(server, "GET", "/api/fleet")[1]["pods"]["sdruntime"]
    finally:
        server.stop()
        pod.close()
    if token:
        assert answer["reachable"] is True and answer["state"]["models"]["ram"] == ["tiny"]
    else:
        assert answer["reachable"] is False and "SDEKS_POD_TOKEN" in answer["error"]
