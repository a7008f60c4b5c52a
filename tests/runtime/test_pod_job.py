"""`POST /v1/jobs` end to end against moto: PNGs and manifest in S3, callback on SNS."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from runtime import infotext
from sdeks.callback import Callback, Manifest
from tests.runtime.conftest import pod_app

CONTEXT = {"ticket": "T-1", "nested": [1, {"a": None}], "unicode": "ü✓"}


@pytest.fixture(params=["no-table"])
def pod(request, stack, aws, tiny_models_dir: Path, tmp_path: Path):
    """The pod app over moto; `request.param` "table" gives it the task table."""
    app = pod_app(
        stack,
        aws,
        tiny_models_dir,
        tmp_path,
        task_table=stack.task_table if request.param == "table" else None,
        slots=2 if request.param == "two-slots" else 1,
    )
    with TestClient(app) as client:
        yield client


def job(task_id: str, tasktype: str = "text-to-image", **content) -> dict:
    body = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 7}
    body.update(content)
    return {
        "task": {
            "id": task_id,
            "runtime": "sdruntime",
            "tasktype": tasktype,
            "prefix": "out/pod",
            "context": CONTEXT,
            "content": body,
        },
        "published_at": time.time() - 1,
    }


def read(aws, url: str) -> bytes:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return aws.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def png_b64(width: int = 64, height: int = 64, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_post_job_text_to_image_writes_outputs_and_publishes(pod, aws, stack, callbacks):
    response = pod.post("/v1/jobs", json=job("t2i-1", batch_size=2, n_iter=2, height=48))

    assert response.status_code == 200
    callback = Callback.model_validate(response.json())
    assert callback.status == "succeeded", callback.error
    assert callback.result is True
    assert callback.seeds == [7, 8, 9, 10]
    assert callback.context == CONTEXT
    bucket = stack.output_bucket
    assert callback.output_location == f"s3://{bucket}/out/pod/t2i-1"
    assert callback.image_url == [f"s3://{bucket}/out/pod/t2i-1/t2i-1-{n}.png" for n in range(1, 5)]
    assert callback.output_url == f"s3://{bucket}/out/pod/t2i-1/t2i-1.json"
    assert callback.timings.queued_ms >= 1000
    assert callback.info["all_seeds"] == [7, 8, 9, 10]
    for n, url in enumerate(callback.image_url):
        image = Image.open(io.BytesIO(read(aws, url)))
        image.load()
        assert image.size == (64, 48)
        parsed = infotext.parse(image.info["parameters"])
        assert parsed["Seed"] == str(7 + n)
        assert parsed["Prompt"] == "a red cube"
        assert image.info["parameters"] == callback.info["infotexts"][n]
    manifest = Manifest.model_validate_json(read(aws, callback.output_url))
    assert manifest.status == "succeeded"
    assert manifest.seeds == callback.seeds
    assert manifest.context == CONTEXT
    assert manifest.images == [f"out/pod/t2i-1/t2i-1-{n}.png" for n in range(1, 5)]
    assert manifest.parameters["steps"] == 2

    published = callbacks()
    assert [c.id for c in published] == ["t2i-1"]
    assert published[0].model_dump() == callback.model_dump()


def test_post_job_image_to_image(pod, aws, callbacks):
    response = pod.post(
        "/v1/jobs",
        json=job(
            "i2i-1",
            "image-to-image",
            init_images=[png_b64(80, 80)],
            seed=-1,
            denoising_strength=0.5,
        ),
    )

    callback = Callback.model_validate(response.json())
    assert callback.status == "succeeded", callback.error
    assert len(callback.image_url) == 1
    assert callback.seeds[0] >= 0
    image = Image.open(io.BytesIO(read(aws, callback.image_url[0])))
    assert image.size == (64, 64)
    assert "Denoising strength: 0.5" in image.info["parameters"]
    assert [c.status for c in callbacks()] == ["succeeded"]


def test_post_job_upscale(pod, aws):
    response = pod.post(
        "/v1/jobs",
        json=job(
            "up-1",
            "extra-single-image",
            image=png_b64(32, 16),
            upscaler_1="Lanczos",
            upscaling_resize=2,
        ),
    )

    callback = Callback.model_validate(response.json())
    assert callback.status == "succeeded", callback.error
    image = Image.open(io.BytesIO(read(aws, callback.image_url[0])))
    assert image.size == (64, 32)


BAD_TASKS = [
    ({"width": 65}, "invalid_parameter", "`width`"),
    ({"steps": 100000}, "invalid_parameter", "`steps`"),
    ({"sampler_name": "DPM fast"}, "invalid_parameter", "Euler a"),
    ({"steps": "many"}, "invalid_parameter", "steps"),
    ({"alwayson_scripts": {"sd_model_checkpoint": "nope.safetensors"}}, "model_not_found", "nope"),
    (
        {"alwayson_scripts": {"sd_model_checkpoint": 5}},
        "invalid_parameter",
        "`alwayson_scripts.sd_model_checkpoint` must be a string",
    ),
    # counted, not expanded: a range of a billion seeds must not become a list first
    (
        {"script_name": "X/Y/Z plot", "script_args": [1, "1-1000000000", []]},
        "invalid_parameter",
        "`script_args` x_values has more than 64 values",
    ),
]


def test_post_job_bad_tasks_get_failed_callbacks(pod, aws, callbacks):
    for n, (content, code, needle) in enumerate(BAD_TASKS):
        response = pod.post("/v1/jobs", json=job(f"bad-{n}", **content))

        assert response.status_code == 200
        callback = Callback.model_validate(response.json())
        assert callback.status == "failed"
        assert callback.result is False
        assert callback.error.code == code
        assert needle in callback.error.message
        assert callback.image_url == []
        assert callback.context == CONTEXT
        manifest = Manifest.model_validate_json(read(aws, callback.output_url))
        assert manifest.error.code == code
    published = sorted(callbacks() + callbacks(), key=lambda c: c.id or "")
    assert [c.error.code for c in published] == [code for _, code, _ in BAD_TASKS]


def test_post_job_undecodable_init_image_names_the_field(pod):
    response = pod.post(
        "/v1/jobs", json=job("bad-img", "image-to-image", init_images=["bm90IGFuIGltYWdl"])
    )

    callback = Callback.model_validate(response.json())
    assert callback.error.code == "invalid_parameter"
    assert "init_images[0]" in callback.error.message


def test_cancel_mid_run_ends_cancelled(pod, callbacks):
    result: dict = {}

    def post() -> None:
        result["response"] = pod.post(
            "/v1/jobs", json=job("slow-1", steps=150, width=256, height=256)
        )

    thread = threading.Thread(target=post)
    thread.start()
    deadline = time.time() + 60
    running = []
    while time.time() < deadline:
        running = pod.get("/v1/state").json()["running"]
        if running and running[0]["step"] >= 1:
            break
        time.sleep(0.02)
    assert running and running[0]["id"] == "slow-1"
    busy = pod.post("/v1/jobs", json=job("other-1"))
    assert busy.status_code == 429
    assert pod.post("/v1/jobs/slow-1/cancel").json() == {"id": "slow-1", "cancelled": True}
    thread.join(60)

    callback = Callback.model_validate(result["response"].json())
    assert callback.status == "cancelled"
    assert callback.error.code == "cancelled"
    assert [c.status for c in callbacks()] == ["cancelled"]
    assert pod.get("/v1/state").json()["free_slots"] == 1


def test_state_and_health(pod):
    assert pod.get("/health").status_code == 200
    assert pod.post("/v1/jobs", json=job("warm-1")).json()["status"] == "succeeded"
    state = pod.get("/v1/state").json()
    assert state["models"]["ram"] == ["tiny-sd15"]
    assert state["slots"] == 1 and state["free_slots"] == 1 and state["busy"] is False
    assert "tiny-sd15" in json.dumps(state["models"])
    assert pod.post("/v1/jobs/none/cancel").status_code == 404


# --- with the task table: exactly one terminal callback, cancel through the table ---


@pytest.mark.parametrize("pod", ["table"], indirect=True)
def test_redelivered_finished_task_is_not_rendered_or_reported_again(pod, aws, stack, callbacks):
    first = Callback.model_validate(pod.post("/v1/jobs", json=job("dup-1")).json())
    again = pod.post("/v1/jobs", json=job("dup-1"))

    assert first.status == "succeeded"
    # Not started, nothing published: 409 (not 200, which would tell the dispatcher
    # that this answer's callback exists) sends the dispatcher back to the task table.
    assert again.status_code == 409
    assert again.json()["code"] == "already_ended"
    assert [c.status for c in callbacks()] == ["succeeded"]
    item = aws.dynamodb.get_item(TableName=stack.task_table, Key={"id": {"S": "dup-1"}})["Item"]
    assert item["status"]["S"] == "succeeded"
    assert item["pod"]["S"] == "pod-a"


@pytest.mark.parametrize("pod", ["table"], indirect=True)
def test_cancel_through_the_task_table_stops_the_render(pod, aws, stack, callbacks):
    import asyncio

    from sdeks.lifecycle import Reporter
    from sdeks.tasks import CancelOutcome, TaskTable

    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            r=pod.post("/v1/jobs", json=job("tcancel-1", steps=150, width=256, height=256))
        )
    )
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        item = aws.dynamodb.get_item(TableName=stack.task_table, Key={"id": {"S": "tcancel-1"}})
        if int(item.get("Item", {}).get("progress_done", {}).get("N", "0")) >= 1:
            break
        time.sleep(0.05)
    # What `sdeks cancel` does: a boto3 client works with TaskTable (blocking calls).
    reporter = Reporter(
        aws.sns, stack.callback_topic_arn, table=TaskTable(aws.dynamodb, stack.task_table)
    )
    assert asyncio.run(reporter.cancel("tcancel-1")) is CancelOutcome.CANCEL_REQUESTED
    thread.join(60)

    callback = Callback.model_validate(result["r"].json())
    assert callback.status == "cancelled"
    assert [c.status for c in callbacks()] == ["cancelled"]


def test_callback_with_huge_prompt_fits_in_sns_and_manifest_keeps_all(pod, aws, callbacks):
    prompt = "a red cube, " * 2500  # ~30 KB, repeated in all_prompts and every infotext
    response = pod.post("/v1/jobs", json=job("big-1", prompt=prompt, batch_size=4, n_iter=2))

    callback = Callback.model_validate(response.json())
    assert callback.status == "succeeded", callback.error
    assert len(callback.model_dump_json()) <= 240 * 1024
    assert "all_prompts" not in callback.info and callback.info["all_seeds"] == list(range(7, 15))
    assert [c.id for c in callbacks()] == ["big-1"]
    manifest = Manifest.model_validate_json(read(aws, callback.output_url))
    assert len(manifest.info["infotexts"]) == 8


def test_out_of_memory_fails_the_task_and_the_pod_keeps_serving(pod, monkeypatch, callbacks):
    import torch

    renderer = pod.app.state.pod.renderer
    original = renderer._denoise

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")

    monkeypatch.setattr(renderer, "_denoise", exhausted)
    failed = Callback.model_validate(pod.post("/v1/jobs", json=job("oom-1")).json())
    monkeypatch.setattr(renderer, "_denoise", original)
    after = Callback.model_validate(pod.post("/v1/jobs", json=job("oom-2")).json())

    assert failed.status == "failed" and failed.error.code == "out_of_memory"
    assert after.status == "succeeded"
    assert [c.status for c in callbacks()] == ["failed", "succeeded"]


@pytest.mark.parametrize("pod", ["two-slots"], indirect=True)
def test_two_slots_render_concurrently_and_deterministically(pod, aws):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [job(f"par-{i}", seed=40 + i, sampler_name="DPM++ 2M SDE") for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: pod.post("/v1/jobs", json=b), bodies))
    accepted = [r for r in responses if r.status_code == 200]
    assert all(r.status_code in (200, 429) for r in responses) and len(accepted) >= 2
    for response in accepted:
        callback = Callback.model_validate(response.json())
        assert callback.status == "succeeded", callback.error
        # Rendered alone, the same task gives the same pixels.
        alone = Callback.model_validate(
            pod.post(
                "/v1/jobs",
                json=job(
                    f"{callback.id}-again", seed=callback.seeds[0], sampler_name="DPM++ 2M SDE"
                ),
            ).json()
        )
        first = Image.open(io.BytesIO(read(aws, callback.image_url[0])))
        second = Image.open(io.BytesIO(read(aws, alone.image_url[0])))
        assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("pod", ["table"], indirect=True)
def test_an_attempt_taken_over_while_rendering_writes_and_reports_nothing(
    pod, aws, stack, callbacks, monkeypatch
):
    # GIVEN a render whose task another attempt starts while it renders (its dispatcher
    # died, the message came back and another pod marked the task running)
    import asyncio

    import runtime.jobs
    from sdeks.tasks import TaskTable

    real_run_job = runtime.jobs.run_job

    def taken_over(job, **kwargs):
        table = TaskTable(aws.dynamodb, stack.task_table)
        assert asyncio.run(table.mark_running(job.task.id, pod="pod-b", run="attempt-b"))
        return real_run_job(job, **kwargs)

    monkeypatch.setattr(runtime.jobs, "run_job", taken_over)
    # WHEN the first attempt finishes rendering
    answer = pod.post("/v1/jobs", json=job("fenced-1"))
    # THEN it wrote nothing to S3, published nothing, and left the task to attempt b
    assert answer.status_code == 409 and answer.json()["code"] == "superseded"
    listed = aws.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix="out/pod/fenced-1")
    assert listed.get("KeyCount", 0) == 0
    assert callbacks() == []
    item = aws.dynamodb.get_item(TableName=stack.task_table, Key={"id": {"S": "fenced-1"}})["Item"]
    assert item["status"]["S"] == "running" and item["run"]["S"] == "attempt-b"


def test_post_job_with_a_ui_state_clients_alwayson_scripts(pod, aws):
    # GIVEN what a UI-state client sends on every call: extension entries switched off,
    # A1111's built-in scripts at their defaults, an extension this pod lacks switched off
    scripts = {
        "controlnet": {"args": []},
        "ADetailer": {"args": [False, False, {"ad_model": "None", "ad_tab_enable": True}]},
        "Dynamic Prompts v2.17.1": {"args": [False, False, 1]},
        "Refiner": {"args": [False, "", 0.8]},
        "Seed": {"args": [-1, False, -1, 0, 0, 0]},
        "Soft inpainting": {"args": [False, 1, 0.5, 4, 0, 0.5, 2]},
        "Extra options": {"args": []},
    }
    body = job("ui-state-1", alwayson_scripts=scripts, override_settings={"sd_vae": "none"})
    callback = Callback.model_validate(pod.post("/v1/jobs", json=body).json())
    # THEN it renders, and the script no stage reads is reported, not refused
    assert callback.status == "succeeded", callback.error
    assert callback.seeds == [7]
    manifest = Manifest.model_validate_json(read(aws, callback.output_url))
    assert manifest.ignored_fields == ["alwayson_scripts.Dynamic Prompts v2.17.1"]


def test_dynamic_prompts_corpus_body_renders_each_images_prompt(pod, aws):
    """benchmarks/corpus/58: sd-dynamic-prompts switched on, as a client sends it."""
    corpus = Path(__file__).parents[2] / "benchmarks" / "corpus" / "58_dynamic_prompts_on.json"
    body = json.loads(corpus.read_text())["body"]
    body.update(steps=2, width=64, height=64, seed=7, batch_size=3)
    callback = Callback.model_validate(pod.post("/v1/jobs", json=job("dp-1", **body)).json())

    assert callback.status == "succeeded", callback.error
    prompts = callback.info["all_prompts"]
    assert len(prompts) == 3 and set(prompts) <= {"a red car", "a green car", "a blue car"}
    assert callback.info["prompt"] == "a {red|green|blue} car"
    for n, url in enumerate(callback.image_url):
        parsed = infotext.parse(Image.open(io.BytesIO(read(aws, url))).info["parameters"])
        assert parsed["Prompt"] == prompts[n] and parsed["Seed"] == str(7 + n)
    manifest = Manifest.model_validate_json(read(aws, callback.output_url))
    assert not [f for f in manifest.ignored_fields if "Dynamic" in f]
