"""The sd-webui-controlnet extension's API of a pod (`/controlnet/*`) and a txt2img with a unit."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def square() -> Image.Image:
    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=(255, 255, 255))
    return image


@pytest.fixture(scope="module")
def client(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings
    from runtime.tiny_controlnet import make_tiny_controlnet

    root = tmp_path_factory.mktemp("cn-api-models")
    shutil.copytree(tiny_models_dir, root, dirs_exist_ok=True)
    make_tiny_controlnet(root / "ControlNet" / "control_tiny_sd15_canny", family="sd15")
    cache = tmp_path_factory.mktemp("cn-api-cache")
    settings = RuntimeSettings(default_model="tiny-sd15", models=str(root), cache_dir=cache)
    store = ModelStore(LocalSource(root), cache_dir=cache)
    with TestClient(create_app(settings, models=store)) as test_client:
        yield test_client


def test_version_settings_and_lists(client):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/settings").json()["control_net_unit_count"] >= 3
    assert client.get("/controlnet/model_list").json() == {
        "model_list": ["control_tiny_sd15_canny"]
    }
    modules = client.get("/controlnet/module_list").json()
    assert {"none", "canny", "softedge_hed", "openpose"} <= set(modules["module_list"])
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] is True
    assert [s["value"] for s in canny["sliders"]] == [512, 100, 200]
    assert modules["module_detail"]["softedge_hed"]["model_free"] is False
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert "invert" in aliases["module_list"]


def test_detect_runs_the_preprocessor(client):
    response = client.post(
        "/controlnet/detect",
        json={
            "controlnet_module": "canny",
            "controlnet_input_images": [b64(square())],
            "controlnet_processor_res": 64,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["info"] == "Success"
    edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))
    assert edges.shape[:2] == (64, 64)
    assert edges[14:19, 30].max() == 255  # the square's top edge
    assert edges[32, 32].max() == 0  # inside: no edge


def test_detect_unknown_module_names_it(client):
    response = client.post(
        "/controlnet/detect",
        json={"controlnet_module": "nope", "controlnet_input_images": [b64(square())]},
    )
    assert response.status_code == 422
    assert "'nope'" in json.dumps(response.json())


def test_detect_model_based_module_without_weights_names_the_file(client):
    response = client.post(
        "/controlnet/detect",
        json={"controlnet_module": "softedge_hed", "controlnet_input_images": [b64(square())]},
    )
    assert response.status_code == 404
    assert "ControlNet/annotators/ControlNetHED.pth" in json.dumps(response.json())


def test_txt2img_with_a_unit_named_as_the_extension_names_it(client):
    body = {"prompt": "a cube", "steps": 2, "width": 64, "height": 64, "seed": 3}
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    unit = {
        "enabled": True,
        "module": "canny",
        "model": "control_tiny_sd15_canny [abcdef12]",
        "input_image": b64(square()),
        "resize_mode": 1,
        "control_mode": "ControlNet is more important",
    }
    with_cn = client.post(
        "/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    )
    assert with_cn.status_code == 200, with_cn.text
    result = with_cn.json()
    assert result["images"][0] != plain["images"][0]
    info = json.loads(result["info"])
    assert "Control Mode: ControlNet is more important" in info["infotexts"][0]
    assert info["extra_generation_params"]["ControlNet 0"].startswith("Module: canny")


def test_scripts_lists_controlnet_and_adetailer(client):
    scripts = client.get("/sdapi/v1/scripts").json()
    for kind in ("txt2img", "img2img"):
        assert {"controlnet", "adetailer"} <= set(scripts[kind])


def test_adetailer_api_lists_the_detectors_by_the_names_clients_send(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
):
    from runtime.app import create_app
    from runtime.detectors import save_tiny_detector
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    root = tmp_path_factory.mktemp("ad-api-models")
    shutil.copytree(tiny_models_dir, root, dirs_exist_ok=True)
    save_tiny_detector(root / "adetailer" / "face_yolov8n.pt2")
    (root / "adetailer" / "hand_yolov8s.pt").write_bytes(b"an ultralytics pickle")
    cache = tmp_path_factory.mktemp("ad-api-cache")
    settings = RuntimeSettings(default_model="tiny-sd15", models=str(root), cache_dir=cache)
    app = create_app(settings, models=ModelStore(LocalSource(root), cache_dir=cache))
    with TestClient(app) as client:
        assert client.get("/adetailer/v1/version").json()["version"]
        listed = client.get("/adetailer/v1/ad_model").json()["ad_model"]
        schema = client.get("/adetailer/v1/schema").json()
    # The .pt2 export is offered under the .pt name the extension's users know.
    assert sorted(listed) == ["face_yolov8n.pt", "hand_yolov8s.pt"]
    fields = schema["properties"]
    assert fields["ad_tab_enable"] == {"title": "Ad Tab Enable", "default": True, "type": "boolean"}
    assert fields["ad_confidence"]["type"] == "number" and fields["ad_confidence"]["default"] == 0.3
    assert "ad_mask_k" in fields and "ad_tap_enable" not in fields
