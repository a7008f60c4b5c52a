"""The pod as the local stack and Kubernetes run it: `python -m runtime`, over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from runtime.settings import RuntimeSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pod_process(stack, aws, tiny_models_dir: Path, tmp_path: Path):
    """`python -m runtime --models DIR --port N --host 127.0.0.1 --device cpu` against moto."""
    port = free_port()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": aws.endpoint,
        "SDEKS_CALLBACK_TOPIC_ARN": stack.callback_topic_arn,
        "SDEKS_OUTPUT_BUCKET": stack.output_bucket,
        "SDEKS_RUNTIME": "sdruntime",
        "SDEKS_DEFAULT_MODEL": "tiny-sd15",
        "SDEKS_CACHE_DIR": str(tmp_path / "cache"),
        "SDEKS_TORCH_THREADS": "1",
    }
    log = (tmp_path / "pod.log").open("wb")
    cmd = [sys.executable, "-m", "runtime", "--models", str(tiny_models_dir), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "pod.log").read_text()[-2000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield url, proc, tmp_path / "pod.log"
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_entry_point_serves_jobs_metrics_and_stops_on_sigterm(pod_process, stack):
    url, proc, log_path = pod_process
    job = {
        "task": {
            "id": "cli-1",
            "runtime": "sdruntime",
            "tasktype": "text-to-image",
            "prefix": "cli",
            "context": {"k": [1, 2]},
            "content": {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 3},
        }
    }
    response = httpx.post(f"{url}/v1/jobs", json=job, timeout=120)
    assert response.status_code == 200, response.text
    callback = response.json()
    assert callback["status"] == "succeeded"
    assert callback["image_url"] == [f"s3://{stack.output_bucket}/cli/cli-1/cli-1-1.png"]
    assert callback["context"] == {"k": [1, 2]}

    metrics = httpx.get(f"{url}/metrics").text
    assert (
        'sdeks_runtime_jobs_total{api="jobs",status="succeeded",tasktype="text-to-image"} 1.0'
        in metrics
    )
    assert "sdeks_runtime_phase_seconds_bucket" in metrics
    state = httpx.get(f"{url}/v1/state").json()
    assert state["runtime"] == "sdruntime" and state["free_slots"] == 1

    # uvicorn drains, shuts down, then re-raises the captured SIGTERM (exit status -15).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert "Finished server process" in log_path.read_text()


def test_settings_from_env_and_bounds(monkeypatch):
    monkeypatch.setenv("SDEKS_SLOTS", "3")
    monkeypatch.setenv("SDEKS_MAX_PIXELS", "1048576")
    monkeypatch.setenv("SDEKS_DEVICE", "cuda")
    settings = RuntimeSettings()
    assert (settings.slots, settings.max_pixels, settings.device) == (3, 1048576, "cuda")
    assert settings.callback_topic_arn is None  # a standalone pod needs no AWS
    monkeypatch.setenv("SDEKS_SLOTS", "0")
    with pytest.raises(ValueError, match="slots"):
        RuntimeSettings()


def test_importing_api_models_and_settings_does_not_import_torch():
    code = (
        "import sys, runtime.a1111, runtime.settings, runtime.samplers, runtime.infotext, "
        "runtime.seeds; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_jobs_answer_503_without_aws_settings(tiny_models_dir: Path, tmp_path: Path):
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path)
    app = create_app(RuntimeSettings(default_model="tiny-sd15"), models=store)
    with TestClient(app) as client:
        job = {
            "task": {"id": "a", "runtime": "sdruntime", "tasktype": "text-to-image", "prefix": "p"}
        }
        response = client.post("/v1/jobs", json=job)
        assert response.status_code == 503
        assert "SDEKS_OUTPUT_BUCKET" in response.json()["detail"]


def test_prefetch_loads_a_model_into_ram_ahead(tiny_models_dir: Path, tmp_path: Path):
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path)
    with TestClient(create_app(RuntimeSettings(default_model="tiny-sd15"), models=store)) as client:
        response = client.post("/v1/prefetch", json={"model": "tiny-sdxl"})
        assert response.status_code == 202 and response.json()["accepted"] is True
        deadline = time.time() + 60
        while (
            time.time() < deadline
            and "tiny-sdxl" not in client.get("/v1/state").json()["models"]["ram"]
        ):
            time.sleep(0.05)
        assert "tiny-sdxl" in client.get("/v1/state").json()["models"]["ram"]
        missing = client.post("/v1/prefetch", json={"model": "ghost.safetensors"})
        assert missing.status_code == 404 and missing.json()["code"] == "model_not_found"


def test_compiled_unet_is_made_once_per_unet(tiny_models_dir: Path, tmp_path: Path):
    import torch

    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.render import Renderer

    renderer = Renderer(
        ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path), RuntimeSettings()
    )
    unet, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    first = renderer._compiled(unet)
    assert renderer._compiled(unet) is first
    assert renderer._compiled(other) is not first
