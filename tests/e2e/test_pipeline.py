"""Publish to SNS on the embedded stack, get PNGs in S3 and exactly the right callback."""

from __future__ import annotations

import base64
import io
import json
import socket
import uuid

import pytest
from PIL import Image

from sdeks.callback import Callback, Manifest
from sdeks.envelope import Task, TaskType
from tests.e2e.conftest import png_bytes

TIMEOUT_S = 240


def envelope(task_id: str, **content) -> dict:
    body = {
        "prompt": "a red cube",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 7,
        "alwayson_scripts": {"sd_model_checkpoint": "tiny-sd15"},
    }
    body.update(content)
    return Task(
        id=task_id,
        runtime="sdruntime",
        tasktype=TaskType.IMAGE_TO_IMAGE if "init_images" in body else TaskType.TEXT_TO_IMAGE,
        prefix="e2e",
        context={"ticket": task_id, "nested": [1, {"a": None}], "unicode": "ü✓"},
        content=body,
    ).to_envelope()


def run(client, bodies: list[dict], *, attribute: bool = True, ids=None) -> dict[str, Callback]:
    ids = ids or [b["task"]["metadata"]["id"] for b in bodies]
    with client.listen(ids) as listener:
        for body in bodies:
            runtime = body["task"]["metadata"]["runtime"] if "task" in body else "sdruntime"
            client.publish(body, runtime=runtime, attribute=attribute)
        return listener.wait_terminal(ids, timeout_s=TIMEOUT_S)


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def read_object(local, url: str) -> bytes:
    from sdeks.aws import parse_s3_url

    bucket, key = parse_s3_url(url)
    return local.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def test_text_to_image_end_to_end(local, client):
    task_id = new_id("t2i")
    body = envelope(task_id, batch_size=2, n_iter=2, width=64, height=48)
    callback = run(client, [body])[task_id]

    assert callback.status == "succeeded", callback.error
    assert callback.result is True
    assert callback.error is None
    assert callback.context == body["task"]["metadata"]["context"]
    bucket = local.resources.output_bucket
    assert callback.output_location == f"s3://{bucket}/e2e/{task_id}"
    assert callback.image_url == [
        f"s3://{bucket}/e2e/{task_id}/{task_id}-{n}.png" for n in range(1, 5)
    ]
    assert callback.output_url == f"s3://{bucket}/e2e/{task_id}/{task_id}.json"
    for url in callback.image_url:
        image = Image.open(io.BytesIO(read_object(local, url)))
        image.load()
        assert image.size == (64, 48)
        assert "Steps: 2" in image.info["parameters"]
    # A1111 seeds: all_seeds[i] = seed + i.
    assert callback.seeds == [7, 8, 9, 10]
    manifest = Manifest.model_validate_json(read_object(local, callback.output_url))
    assert manifest.seeds == callback.seeds
    assert manifest.status == "succeeded"
    assert manifest.context == callback.context


def test_image_to_image_from_s3_and_http_links(local, client, image_server):
    s3_id, http_id = new_id("i2i-s3"), new_id("i2i-http")
    local.client("s3").put_object(Bucket=local.input_bucket, Key="in.png", Body=png_bytes())
    bodies = [
        envelope(s3_id, init_images=[f"s3://{local.input_bucket}/in.png"], seed=-1),
        envelope(http_id, init_images=[f"{image_server}/img.png"], denoising_strength=0.5),
    ]
    results = run(client, bodies)
    for task_id in (s3_id, http_id):
        callback = results[task_id]
        assert callback.status == "succeeded", callback.error
        assert len(callback.image_url) == 1
        assert len(callback.seeds) == 1
    # seed -1 resolves to a concrete seed that is reported
    assert results[s3_id].seeds[0] >= 0


def test_task_without_runtime_attribute_is_served_through_the_catch_all(client):
    task_id = new_id("no-attr")
    callback = run(client, [envelope(task_id)], attribute=False)[task_id]
    assert callback.status == "succeeded", callback.error


def test_invalid_envelope_gets_a_failed_callback_with_its_id(client):
    task_id = new_id("bad")
    body = envelope(task_id)
    body["task"]["metadata"]["tasktype"] = "video"
    callback = run(client, [body])[task_id]
    assert callback.status == "failed"
    assert callback.result is False
    assert callback.error.code == "invalid_envelope"
    assert "tasktype" in callback.error.message


def test_unknown_runtime_gets_a_failed_callback(client):
    task_id = new_id("unknown-rt")
    body = envelope(task_id)
    body["task"]["metadata"]["runtime"] = "nosuchruntime"
    callback = run(client, [body])[task_id]
    assert callback.status == "failed"
    assert callback.error.code == "unknown_runtime"
    assert callback.context == body["task"]["metadata"]["context"]


def test_unknown_model_gets_a_failed_callback(client):
    task_id = new_id("no-model")
    body = envelope(task_id, alwayson_scripts={"sd_model_checkpoint": "does-not-exist.safetensors"})
    callback = run(client, [body])[task_id]
    assert callback.status == "failed"
    assert callback.error.code == "model_not_found"
    assert "does-not-exist" in callback.error.message


def test_unreachable_link_gets_a_failed_callback(client):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    task_id = new_id("dead-link")
    body = envelope(task_id, init_images=[f"http://127.0.0.1:{port}/gone.png"])
    callback = run(client, [body])[task_id]
    assert callback.status == "failed"
    assert callback.error.code == "link_unreachable"
    assert f"127.0.0.1:{port}" in callback.error.message


@pytest.mark.parametrize("example", ["serverless-txt2img.json", "legacy-a1111.json"])
def test_other_envelope_shapes_are_served(client, example):
    from pathlib import Path

    body = json.loads((Path(__file__).parents[2] / "examples" / example).read_text())
    task_id = new_id(example.split("-")[0])
    if "input" in body:
        body["id"] = task_id
    else:
        body["alwayson_scripts"]["id_task"] = task_id
    with client.listen([task_id]) as listener:
        client.publish(body, runtime="sdruntime")
        callback = listener.wait_terminal([task_id], timeout_s=TIMEOUT_S)[task_id]
    assert callback.status == "succeeded", callback.error
    assert callback.runtime == "sdruntime"


def test_extra_batch_images_end_to_end(local, client):
    """`extra-batch-images` through SNS: a model upscaler, one PNG per input image."""
    task_id = new_id("extras-batch")
    images = [
        {"data": base64.b64encode(png_bytes(24, color)).decode(), "name": f"in{i}.png"}
        for i, color in enumerate([(200, 80, 40), (10, 120, 240), (90, 90, 90)])
    ]
    body = Task(
        id=task_id,
        runtime="sdruntime",
        tasktype=TaskType.EXTRA_BATCH_IMAGES,
        prefix="e2e",
        content={"imageList": images, "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2},
    ).to_envelope()
    callback = run(client, [body])[task_id]

    assert callback.status == "succeeded", callback.error
    assert len(callback.image_url) == 3
    for url in callback.image_url:
        image = Image.open(io.BytesIO(read_object(local, url)))
        image.load()
        assert image.size == (48, 48)
        assert "Postprocess upscaler: R-ESRGAN 4x+" in image.info["parameters"]


def test_unknown_upscaler_task_fails_naming_it(client):
    task_id = new_id("extras-unknown")
    body = Task(
        id=task_id,
        runtime="sdruntime",
        tasktype=TaskType.EXTRA_SINGLE_IMAGE,
        prefix="e2e",
        content={"image": base64.b64encode(png_bytes(16)).decode(), "upscaler_1": "4x-Nope"},
    ).to_envelope()
    callback = run(client, [body])[task_id]
    assert callback.status == "failed"
    assert callback.error.code == "invalid_parameter"
    assert "4x-Nope" in callback.error.message and "R-ESRGAN 4x+" in callback.error.message


def test_eks_sample_legacy_body_with_uid_and_sd_vae(local, client):
    """The EKS sample's own test body (test/v1alpha1/t2i.json) plus its `sd_vae` key: `uid`
    and `sd_vae` ride in `alwayson_scripts`, are not scripts, and `sd_vae` picks the VAE."""
    import urllib.request

    from safetensors.torch import load_file, save_file

    # GIVEN a VAE file in the models bucket (the tiny model's VAE, brightened)
    assert local.resources
    vae_dir = local.workdir / "models" / "tiny-sd15" / "vae"
    state = {
        k: v * 1.5 for k, v in load_file(vae_dir / "diffusion_pytorch_model.safetensors").items()
    }
    vae_file = local.workdir / "legacy-vae.safetensors"
    save_file(state, str(vae_file))
    local.client("s3").upload_file(
        str(vae_file), local.resources.models_bucket, "VAE/legacy-vae.safetensors"
    )
    for urls in local.pod_urls().values():  # the pods list the bucket again now
        for url in urls:
            request = urllib.request.Request(f"{url}/sdapi/v1/refresh-checkpoints", method="POST")
            urllib.request.urlopen(request, timeout=30).close()
    task_id = new_id("legacy-vae")
    body = {
        "alwayson_scripts": {
            "task": "text-to-image",
            "sd_model_checkpoint": "tiny-sd15",
            "id_task": task_id,
            "uid": "123",
            "save_dir": "outputs",
            "sd_vae": "legacy-vae",
        },
        "prompt": "A dog",
        "steps": 2,
        "width": 64,
        "height": 64,
    }
    # WHEN it is published to SNS as the sample publishes it
    with client.listen([task_id]) as listener:
        client.publish(body, runtime="sdruntime")
        callback = listener.wait_terminal([task_id], timeout_s=TIMEOUT_S)[task_id]
    # THEN it renders with that VAE
    assert callback.status == "succeeded", callback.error
    assert callback.info["sd_vae_name"] == "legacy-vae"
    assert "VAE: legacy-vae" in callback.info["infotexts"][0]
