"""`make demo`: the whole pipeline on this machine, end to end.

Starts the embedded local stack, publishes the examples (text-to-image, and
image-to-image twice: from an `s3://` init image and from an `http://` link
served on 127.0.0.1), waits for their callbacks, downloads the PNGs into
`./outputs/<id>/`, prints a table and stops the stack. Each run publishes under
fresh ids (`demo-t2i-<6 hex>`): an id is single-use, so a run never collides
with the outputs or the task record of an earlier one.
"""

from __future__ import annotations

import copy
import http.server
import json
import logging
import sys
import threading
import time
import uuid
from pathlib import Path

from sdeks.callback import Callback
from sdeks.client import SdeksClient
from sdeks.local import EXAMPLE_INIT_IMAGE_KEY, LocalStack, init_image_png
from sdeks.logs import configure_logging

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
log = logging.getLogger("sdeks.demo")


def serve_once(
    payload: bytes, path: str = "/cat.png", content_type: str = "image/png"
) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `payload` at `path` on 127.0.0.1 (the http:// link example); 404 elsewhere."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != path:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{path}"


def main() -> int:
    configure_logging("text", "INFO")
    out_dir = Path("outputs")
    run = uuid.uuid4().hex[:6]
    with LocalStack(workdir=Path(".sdeks"), moto_port=0, example_inputs=True) as stack:
        server, http_link = serve_once(init_image_png())

        t2i = json.loads((EXAMPLES / "text-to-image.json").read_text())
        i2i_s3 = json.loads((EXAMPLES / "image-to-image.json").read_text())
        assert i2i_s3["task"]["content"]["init_images"] == [
            f"s3://{stack.input_bucket}/{EXAMPLE_INIT_IMAGE_KEY}"
        ]
        i2i_http = copy.deepcopy(i2i_s3)
        i2i_http["task"]["metadata"]["id"] = "demo-i2i-http"
        i2i_http["task"]["content"]["init_images"] = [http_link]
        tasks = [t2i, i2i_s3, i2i_http]
        for body in tasks:
            body["task"]["metadata"]["id"] += f"-{run}"
        ids = [t["task"]["metadata"]["id"] for t in tasks]

        assert stack.resources is not None
        client = SdeksClient(
            sns=stack.client("sns"),
            sqs=stack.client("sqs"),
            s3=stack.client("s3"),
            task_topic_arn=stack.resources.task_topic_arn,
            callback_topic_arn=stack.resources.callback_topic_arn,
        )
        started = {}
        with client.listen(ids) as listener:
            for body in tasks:
                task_id = body["task"]["metadata"]["id"]
                started[task_id] = time.monotonic()
                client.publish(body, runtime=body["task"]["metadata"]["runtime"])
                log.info("published %s", task_id)
            finished: dict[str, float] = {}

            def on_event(callback: Callback | None) -> None:
                if callback is not None and callback.status.terminal:
                    finished.setdefault(str(callback.id), time.monotonic())

            results = listener.wait_terminal(ids, timeout_s=600, on_event=on_event)
        server.shutdown()

        rows = []
        for task_id in ids:
            callback = results[task_id]
            files = client.download(callback, out_dir) if callback.status == "succeeded" else []
            seconds = finished.get(task_id, time.monotonic()) - started[task_id]
            rows.append((task_id, callback, files, seconds))

    print()
    print(f"{'id':<24} {'status':<10} {'images':>6} {'seconds':>8}  outputs")
    for task_id, callback, files, seconds in rows:
        where = str(files[0].parent) if files else (callback.error.code if callback.error else "")
        print(f"{task_id:<24} {callback.status.value:<10} {len(files):>6} {seconds:>8.1f}  {where}")
    ok = all(cb.status == "succeeded" for _, cb, _, _ in rows)
    print(f"\n{'all tasks succeeded' if ok else 'some tasks failed'}; PNGs under {out_dir}/<id>/")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
