"""The A1111 API of a pod: what an existing A1111 client sends, answered in A1111's shapes."""

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


@pytest.fixture(scope="module")
def client(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    settings = RuntimeSettings(default_model="tiny-sd15", models=str(tiny_models_dir))
    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path_factory.mktemp("cache"))
    with TestClient(create_app(settings, models=store)) as test_client:
        yield test_client


def webuiapi_txt2img_payload(**overrides) -> dict:
    """The body the popular `webuiapi` client (mix1009/sdwebuiapi) posts for txt2img."""
    payload = {
        "enable_hr": False,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "denoising_strength": 0.7,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "a cat",
        "styles": [],
        "seed": 123,
        "subseed": -1,
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 2,
        "n_iter": 1,
        "steps": 3,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "script_args": [],
        "script_name": None,
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
        "sampler_index": "Euler a",
    }
    payload.update(overrides)
    return payload


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_txt2img_answers_in_a1111_shape(client):
    response = client.post("/sdapi/v1/txt2img", json=webuiapi_txt2img_payload())

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    assert isinstance(body["info"], str)  # A1111 sends info as a JSON *string*
    info = json.loads(body["info"])
    assert info["seed"] == 123 and info["all_seeds"] == [123, 124]
    assert len(info["all_subseeds"]) == 2
    assert info["sampler_name"] == "Euler a"
    assert info["sd_model_name"] == "tiny-sd15"
    assert (info["width"], info["height"], info["cfg_scale"]) == (64, 64, 7.0)
    assert len(body["images"]) == 2
    for n, b64 in enumerate(body["images"]):
        image = decode(b64)
        assert image.size == (64, 64)
        assert image.info["parameters"] == info["infotexts"][n]
        assert infotext.parse(image.info["parameters"])["Seed"] == str(123 + n)
    assert body["parameters"]["prompt"] == "a cat"
    assert body["parameters"]["steps"] == 3


def test_txt2img_minimal_body_takes_a1111_defaults(client):
    response = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}
    )
    info = json.loads(response.json()["info"])
    assert info["sampler_name"] == "Euler"  # A1111's API default sampler_index
    assert info["cfg_scale"] == 7.0
    assert info["batch_size"] == 1 and len(response.json()["images"]) == 1
    assert 0 <= info["seed"] < 2**32


def test_img2img_with_mask(client):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 90, 200)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    response = client.post(
        "/sdapi/v1/img2img",
        json={
            "init_images": [f"data:image/png;base64,{init}"],
            "mask": init,
            "prompt": "a dog",
            "steps": 4,
            "width": 64,
            "height": 64,
            "denoising_strength": 0.6,
            "sampler_name": "DPM++ 2M",
            "scheduler": "Karras",
            "include_init_images": False,
        },
    )
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["denoising_strength"] == 0.6
    assert "Schedule type: Automatic" in info["infotexts"][0]  # Karras is DPM++ 2M's default
    assert decode(response.json()["images"][0]).size == (64, 64)


def test_bad_request_is_a1111_error(client):
    response = client.post("/sdapi/v1/txt2img", json={"width": 100, "steps": 2})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_parameter"
    assert "`width`" in response.json()["detail"]
    response = client.post("/sdapi/v1/txt2img", json={"sampler_name": "DPM fast", "steps": 2})
    assert response.status_code == 422 and "Euler a" in response.json()["detail"]
    missing = client.post(
        "/sdapi/v1/txt2img",
        json={
            "steps": 2,
            "width": 64,
            "height": 64,
            "override_settings": {"sd_model_checkpoint": "nope"},
        },
    )
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"


def test_options_persist_and_override_settings_restore(client):
    before = client.get("/sdapi/v1/options").json()
    assert before["sd_model_checkpoint"] == "tiny-sd15"
    assert before["CLIP_stop_at_last_layers"] == 1

    assert (
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"}).json() is None
    )
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sd_model_name"] == "tiny-sdxl"

    # A per-request override restores afterwards by default...
    body["override_settings"] = {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny-sd15"}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sd_model_name"] == "tiny-sd15" and info["clip_skip"] == 2
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sdxl"
    # ...and persists with override_settings_restore_afterwards = false.
    body["override_settings_restore_afterwards"] = False
    client.post("/sdapi/v1/txt2img", json=body)
    after = client.get("/sdapi/v1/options").json()
    assert after["sd_model_checkpoint"] == "tiny-sd15" and after["CLIP_stop_at_last_layers"] == 2

    assert (
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ghost"}).status_code == 404
    )
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


def test_model_listing_and_refresh(client):
    models = client.get("/sdapi/v1/sd-models").json()
    names = {m["model_name"] for m in models}
    assert {"tiny-sd15", "tiny-sdxl", "tiny-sd15-single"} <= names
    for item in models:
        assert set(item) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert client.get("/sdapi/v1/sd-vae").status_code == 200
    assert client.get("/sdapi/v1/loras").json() == []


def test_samplers_schedulers_upscalers(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    by_name = {s["name"]: s for s in samplers}
    assert "k_euler_a" in by_name["Euler a"]["aliases"]
    assert by_name["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    labels = [s["label"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert labels[0] == "Automatic" and "Karras" in labels
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"]  # then the bucket's model upscalers
    assert "R-ESRGAN 4x+" in names


def test_extra_single_image(client):
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (9, 9, 9)).save(buf, format="PNG")
    response = client.post(
        "/sdapi/v1/extra-single-image",
        json={
            "image": base64.b64encode(buf.getvalue()).decode(),
            "upscaler_1": "Nearest",
            "upscaling_resize": 3,
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"html_info", "image"}
    assert decode(body["image"]).size == (60, 30)
    unknown = client.post("/sdapi/v1/extra-single-image", json={"image": "x", "upscaler_1": "LDSR"})
    assert unknown.status_code == 422 and "LDSR" in unknown.json()["detail"]


def test_progress_and_interrupt_keep_finished_images(client):
    body = webuiapi_txt2img_payload(steps=150, width=256, height=256, batch_size=1, n_iter=2)
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(r=client.post("/sdapi/v1/txt2img", json=body))
    )
    thread.start()
    progress: dict = {}
    deadline = time.time() + 60
    while time.time() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.02)
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] == 2
    assert 0 < progress["progress"] < 1
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)

    # A1111 semantics: an interrupted request still answers with what was finished (none here).
    assert result["r"].status_code == 200
    assert result["r"].json()["images"] == []
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_openapi_docs_list_the_a1111_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options", "/v1/jobs"):
        assert route in paths
    assert client.get("/docs").status_code == 200


def test_routing_key_wins_over_override_settings(client):
    body = {
        "steps": 2,
        "width": 64,
        "height": 64,
        "alwayson_scripts": {"sd_model_checkpoint": "tiny-sdxl"},
        "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
    }
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sd_model_name"] == "tiny-sdxl"


def test_png_info_reads_back_the_parameters(client):
    body = {
        "prompt": "a (red) cube",
        "negative_prompt": "dull",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 5,
    }
    image = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert set(info) == {"info", "items", "parameters"}
    assert info["parameters"]["Prompt"] == "a (red) cube"
    assert info["parameters"]["Negative prompt"] == "dull"
    assert info["parameters"]["Seed"] == "5"
    assert info["items"]["parameters"] == info["info"]


@pytest.mark.parametrize("value", ["", "None", "none", "Automatic", "automatic", " None "])
def test_options_accept_every_name_of_the_checkpoints_own_vae(client, value):
    assert client.post("/sdapi/v1/options", json={"sd_vae": value}).status_code == 200


def test_options_refuse_an_unknown_vae_in_a1111_shape(client):
    response = client.post("/sdapi/v1/options", json={"sd_vae": "no-such-vae.safetensors"})
    assert response.status_code == 404
    assert "no-such-vae" in response.text


@pytest.mark.parametrize("section", ["alwayson_scripts", "override_settings"])
def test_non_string_checkpoint_is_refused_in_a1111_shape(client, section):
    body = {"steps": 2, "width": 64, "height": 64, section: {"sd_model_checkpoint": 7}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_parameter"
    assert f"`{section}.sd_model_checkpoint` must be a string, got 7" in response.json()["detail"]


def test_options_refuse_a_non_string_checkpoint(client):
    response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": {"name": "x"}})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_parameter"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] != {"name": "x"}


def test_webuiapi_hires_body_renders_at_the_hires_size(client):
    body = webuiapi_txt2img_payload(
        enable_hr=True, batch_size=1, hr_sampler_name="Use same sampler"
    )
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = decode(response.json()["images"][0])
    assert image.size == (128, 128)
    params = infotext.parse(image.info["parameters"])
    assert params["Hires upscaler"] == "Latent" and params["Size"] == "64x64"
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes


def test_eks_sample_legacy_keys_on_sdapi(client):
    legacy = {
        "task": "text-to-image",
        "id_task": "abc",
        "uid": "123",
        "save_dir": "outputs",
        "sd_model_checkpoint": "tiny-sd15",
        "sd_vae": "Automatic",
    }
    body = webuiapi_txt2img_payload(alwayson_scripts=legacy, batch_size=1)
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    missing = webuiapi_txt2img_payload(alwayson_scripts={**legacy, "sd_vae": "ghost-vae"})
    response = client.post("/sdapi/v1/txt2img", json=missing)
    assert response.status_code == 404 and "ghost-vae" in response.json()["detail"]


def test_ignored_fields_are_derived_from_the_request_models():
    from runtime.a1111 import Img2ImgRequest, Txt2ImgRequest, ignored_fields, known_fields
    from sdeks.envelope import TaskType

    # Every field of the models is known, by construction: a field added to them is too.
    assert set(Txt2ImgRequest.model_fields) <= known_fields(TaskType.TEXT_TO_IMAGE)
    assert set(Img2ImgRequest.model_fields) <= known_fields(TaskType.IMAGE_TO_IMAGE)
    content = {"prompt": "a fox", "promt": "typo", "init_images": ["x"], "steps": 4}
    assert ignored_fields(TaskType.TEXT_TO_IMAGE, content) == ["init_images", "promt"]
    assert ignored_fields(TaskType.IMAGE_TO_IMAGE, content) == ["promt"]
