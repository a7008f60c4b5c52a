"""`python -m dispatcher` as the local stack starts it: env variables in, SIGTERM out."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from tests.dispatcher.conftest import envelope, publish


async def test_main_serves_from_env_and_stops_on_sigterm(aws, stack, make_pod, callbacks):
    pod = await make_pod()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": aws.endpoint,
        "SDEKS_CALLBACK_TOPIC_ARN": stack.callback_topic_arn,
        "SDEKS_OUTPUT_BUCKET": stack.output_bucket,
        "SDEKS_QUEUES": json.dumps(stack.queues),
        "SDEKS_CATCH_ALL_QUEUE_URL": stack.catch_all_queue_url,
        "SDEKS_DISCOVERY": "static",
        "SDEKS_PODS": json.dumps({"sdruntime": [pod.url]}),
        "SDEKS_LINK_ALLOW_NETS": '["127.0.0.1/32"]',
        "SDEKS_S3_ALLOW_BUCKETS": json.dumps([stack.output_bucket]),
        "SDEKS_METRICS_PORT": "0",
        "SDEKS_RECEIVE_WAIT_S": "1",
        "SDEKS_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        publish(aws, stack, envelope("from-main"))
        (got,) = await callbacks.wait_for(1, within=30)
        assert got["id"] == "from-main" and got["status"] == "succeeded"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(line.get("task_id") == "from-main" for line in lines)
    assert any(line["message"] == "dispatcher stopped" for line in lines)
