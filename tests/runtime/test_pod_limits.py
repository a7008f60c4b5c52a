"""Issue 14 on the pod: the task time limit ends a job with one `timeout` callback, and
`/sdapi/v1/options` is validated like request fields, so one call cannot poison a pod."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from sdeks.callback import Callback
from tests.runtime.conftest import pod_app


def _pod(stack, aws, tiny_models_dir: Path, tmp_path: Path, **settings_):
    app = pod_app(stack, aws, tiny_models_dir, tmp_path, pod_name="pod-limits", **settings_)
    return TestClient(app)


def _job(task_id: str, **content) -> dict:
    body = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 7}
    body.update(content)
    return {
        "task": {
            "id": task_id,
            "runtime": "sdruntime",
            "tasktype": "text-to-image",
            "prefix": "out/limits",
            "content": body,
        },
        "model": "tiny-sd15",
    }


def test_job_past_the_time_limit_ends_with_one_timeout_callback(
    stack, aws, tiny_models_dir, tmp_path, callbacks
):
    received = callbacks
    with _pod(stack, aws, tiny_models_dir, tmp_path, task_time_limit_s=0.3) as pod:
        pod.post("/v1/jobs", json=_job("warm-1"))  # the model loads outside the measured job
        received()
        answer = pod.post("/v1/jobs", json=_job("slow-t", steps=150, width=256, height=256))
        assert answer.status_code == 200
        callback = Callback.model_validate(answer.json())
        assert (callback.status, callback.error.code) == ("failed", "timeout")
        assert "time limit" in callback.error.message
        got = received() + received()
        assert [(c.id, c.error.code if c.error else None) for c in got] == [("slow-t", "timeout")]
        assert pod.get("/v1/state").json()["busy"] is False  # the slot is free again


#: Each refused: in A1111's range but past this model's encoder, a boolean, text, a
#: number for a name, a list for a checkpoint, and a bad value beside a harmless one.
BAD_OPTIONS = [
    {"CLIP_stop_at_last_layers": 12},
    {"CLIP_stop_at_last_layers": True},
    {"CLIP_stop_at_last_layers": "2"},
    {"sd_vae": 5},
    {"sd_model_checkpoint": ["x"]},
    {"samples_format": "png", "CLIP_stop_at_last_layers": 0},
]


def test_options_are_validated_and_a_refused_call_changes_nothing(
    stack, aws, tiny_models_dir, tmp_path
):
    with _pod(stack, aws, tiny_models_dir, tmp_path) as pod:
        before = pod.get("/sdapi/v1/options").json()
        for body in BAD_OPTIONS:
            answer = pod.post("/sdapi/v1/options", json=body)
            assert answer.status_code == 422, (body, answer.text)
            assert pod.get("/sdapi/v1/options").json() == before
        # the pod still serves
        assert pod.post("/v1/jobs", json=_job("after-options")).json()["status"] == "succeeded"


def test_unknown_options_are_kept_but_inert(stack, aws, tiny_models_dir, tmp_path):
    with _pod(stack, aws, tiny_models_dir, tmp_path) as pod:
        assert (
            pod.post("/sdapi/v1/options", json={"some_extension_flag": [1, 2]}).status_code == 200
        )
        assert pod.get("/sdapi/v1/options").json()["some_extension_flag"] == [1, 2]
        assert (
            pod.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        )
        assert pod.post("/v1/jobs", json=_job("inert-1")).json()["status"] == "succeeded"


def test_prompt_over_the_runtime_cap_is_refused_naming_it(stack, aws, tiny_models_dir, tmp_path):
    with _pod(stack, aws, tiny_models_dir, tmp_path, max_prompt_chunks=2) as pod:
        answer = pod.post("/v1/jobs", json=_job("long-prompt", prompt="cat, " * 400)).json()
        assert (answer["status"], answer["error"]["code"]) == ("failed", "invalid_parameter")
        assert (
            "`prompt`" in answer["error"]["message"]
            and "limit of 2 chunks" in answer["error"]["message"]
        )
        assert pod.post("/v1/jobs", json=_job("short-prompt")).json()["status"] == "succeeded"
