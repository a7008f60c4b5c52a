"""runtime/extras.py through the A1111 API: model upscalers, crop, batches, faces."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image


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


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(size: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_upscalers_lists_builtins_and_bucket_models(client) -> None:
    items = client.get("/sdapi/v1/upscalers").json()
    names = [i["name"] for i in items]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert {"R-ESRGAN 4x+", "R-ESRGAN General 4xV3", "4x-UltraSharp", "SwinIR 4x"} <= set(names)
    esrgan = next(i for i in items if i["name"] == "R-ESRGAN 4x+")
    assert esrgan["model_name"] == "RealESRGAN_x4plus" and esrgan["scale"] == 4


def test_model_upscaler_is_not_a_lanczos_resize(client) -> None:
    image = _image(24)
    r = client.post(
        "/sdapi/v1/extra-single-image",
        json={"image": _b64(image), "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2},
    )
    assert r.status_code == 200, r.text
    out = _decode(r.json()["image"]).convert("RGB")
    assert out.size == (48, 48)
    lanczos = image.resize((48, 48), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(out, int) - np.asarray(lanczos, int)).mean() > 5
    assert "Postprocess upscaler: R-ESRGAN 4x+" in r.json()["html_info"]


def test_upscale_to_size_with_crop_and_second_upscaler(client) -> None:
    image = _image(24, seed=2).resize((32, 24))
    body = {
        "image": _b64(image),
        "resize_mode": 1,
        "upscaling_resize_w": 64,
        "upscaling_resize_h": 64,
        "upscaling_crop": True,
        "upscaler_1": "SwinIR 4x",
        "upscaler_2": "4x-UltraSharp",
        "extras_upscaler_2_visibility": 0.5,
    }
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    assert _decode(r.json()["image"]).size == (64, 64)
    info = r.json()["html_info"]
    assert (
        "Postprocess upscale to: 64x64" in info and "Postprocess upscaler 2: 4x-UltraSharp" in info
    )
    # Without crop, A1111 keeps the aspect ratio: scale by max(64/32, 64/24).
    r = client.post("/sdapi/v1/extra-single-image", json={**body, "upscaling_crop": False})
    assert _decode(r.json()["image"]).size == (85, 64)


def test_extra_batch_images_returns_one_image_per_input(client) -> None:
    images = [{"data": _b64(_image(16, seed=i)), "name": f"{i}.png"} for i in range(3)]
    r = client.post(
        "/sdapi/v1/extra-batch-images",
        json={"imageList": images, "upscaler_1": "R-ESRGAN General 4xV3", "upscaling_resize": 4},
    )
    assert r.status_code == 200, r.text
    outs = [_decode(d) for d in r.json()["images"]]
    assert [o.size for o in outs] == [(64, 64)] * 3
    assert len({o.tobytes() for o in outs}) == 3


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"upscaler_1": "4x-Nope"}, "invalid_parameter", ["`upscaler_1`", "4x-Nope", "SwinIR 4x"]),
        ({"upscaler_2": "LDSR"}, "invalid_parameter", ["`upscaler_2`", "LDSR", "R-ESRGAN 4x+"]),
        ({"codeformer_visibility": 1}, "model_not_found", ["CodeFormer", "GFPGAN"]),
        ({"gfpgan_visibility": 2}, "invalid_parameter", ["`gfpgan_visibility`"]),
    ],
)
def test_bad_extras_fail_naming_the_field(client, body, code, words) -> None:
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_image(16)), **body})
    assert r.status_code in (400, 404, 422), r.text
    text = r.text
    assert code in text and all(w in text for w in words), text


def test_gfpgan_visibility_blends_restored_faces(client) -> None:
    image = _image(64, seed=4)
    full = client.post(
        "/sdapi/v1/extra-single-image",
        json={"image": _b64(image), "gfpgan_visibility": 1, "upscaling_resize": 1},
    ).json()
    half = client.post(
        "/sdapi/v1/extra-single-image",
        json={"image": _b64(image), "gfpgan_visibility": 0.5, "upscaling_resize": 1},
    ).json()
    a, f, h = (
        np.asarray(x, float)
        for x in (
            image,
            _decode(full["image"]).convert("RGB"),
            _decode(half["image"]).convert("RGB"),
        )
    )
    assert np.abs(f - a).mean() > 1
    np.testing.assert_allclose(h, (a + f) / 2, atol=1.5)
    assert "GFPGAN visibility: 0.5" in half["html_info"]


def test_face_restorers_route(client) -> None:
    assert [i["name"] for i in client.get("/sdapi/v1/face-restorers").json()] == ["GFPGAN"]


def test_restore_faces_in_txt2img_uses_the_option(client) -> None:
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3}
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    restored = client.post(
        "/sdapi/v1/txt2img",
        json={
            **body,
            "restore_faces": True,
            "override_settings": {"face_restoration_model": "GFPGAN"},
        },
    )
    assert restored.status_code == 200, restored.text
    data = restored.json()
    assert data["images"][0] != plain["images"][0]
    assert "Face restoration: GFPGAN" in data["info"]
    # No restorer chosen: the installed one (GFPGAN) serves, as clients that send only
    # `restore_faces: true` expect; CodeFormer asked for by name is refused by name.
    default = client.post("/sdapi/v1/txt2img", json={**body, "restore_faces": True})
    assert default.status_code == 200, default.text
    assert "Face restoration: GFPGAN" in default.json()["info"]
    assert default.json()["images"][0] == data["images"][0]
    r = client.post(
        "/sdapi/v1/txt2img",
        json={
            **body,
            "restore_faces": True,
            "override_settings": {"face_restoration_model": "CodeFormer"},
        },
    )
    assert r.status_code != 200 and "CodeFormer" in r.text


def test_hires_fix_runs_a_model_upscaler(client) -> None:
    body = {
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 5,
        "enable_hr": True,
        "hr_scale": 2,
        "denoising_strength": 0.3,
    }
    lanczos = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Lanczos"})
    model = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "R-ESRGAN 4x+"})
    assert model.status_code == 200, model.text
    a, b = _decode(lanczos.json()["images"][0]), _decode(model.json()["images"][0])
    assert a.size == b.size == (128, 128)
    assert np.abs(np.asarray(a, int) - np.asarray(b, int)).mean() > 2
    assert "Hires upscaler: R-ESRGAN 4x+" in model.json()["info"]


def test_make_tiny_cli_writes_other_kinds(tmp_path: Path) -> None:
    from sdeks.cli import main

    assert main(["models", "make-tiny", str(tmp_path), "--kind", "upscalers"]) == 0
    assert (tmp_path / "RealESRGAN/RealESRGAN_x4plus.safetensors").is_file()
    assert main(["models", "make-tiny", str(tmp_path), "--kind", "faces"]) == 0
    assert (tmp_path / "GFPGAN/GFPGANv1.4.safetensors").is_file()
    from runtime.tiny_kinds import CODEFORMER_KEY, codeformer_available

    # The tiny CodeFormer comes too where its (opt-in) architecture is installed.
    assert (tmp_path / CODEFORMER_KEY).is_file() == codeformer_available()


def test_extras_hold_a_slot_and_queue_behind_each_other(client) -> None:
    """Extras take the pod's slot as renders do: while one runs the pod reports it busy,
    and with one slot a second extras request waits for the first to end."""
    import threading

    pod = client.app.state.pod
    assert pod.settings.slots == 1
    extras = pod.renderer.extras
    first_in, release = threading.Event(), threading.Event()
    active, peak = [0], [0]
    guard = threading.Lock()

    def holding(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        first_in.set()
        try:
            release.wait(30)
            return extras(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    body = {"image": _b64(_image(16)), "upscaler_1": "Nearest", "upscaling_resize": 2}
    answers: list = []
    pod.renderer.extras = holding
    try:
        threads = [
            threading.Thread(
                target=lambda: answers.append(
                    client.post("/sdapi/v1/extra-single-image", json=body)
                )
            )
            for _ in range(2)
        ]
        threads[0].start()
        assert first_in.wait(30)
        state = client.get("/v1/state").json()
        assert state["busy"] is True and state["free_slots"] == 0
        threads[1].start()
        time.sleep(0.5)  # room for the second request to (wrongly) start beside the first
        release.set()
        for thread in threads:
            thread.join(60)
    finally:
        pod.renderer.extras = extras
    assert [a.status_code for a in answers] == [200, 200]
    assert peak[0] == 1
    assert client.get("/v1/state").json()["busy"] is False


def test_a_model_pass_over_the_pixel_limit_is_refused_before_it_runs(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A 4x model asked for 1.01x on a 4100 px image would make a 16400 px image (over
    sdeks.bounds.MAX_PIXELS) before the resize: refused, naming the field, unrun."""
    from runtime import upscaler_models as um
    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    def never(*_a, **_k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(um, "run_tiled", never)
    settings = RuntimeSettings(
        default_model="tiny-sd15", models=str(tiny_models_dir), max_upscale_pixels=20_000_000
    )
    store = ModelStore(LocalSource(tiny_models_dir), cache_dir=tmp_path / "cache")
    body = {
        "image": _b64(Image.new("RGB", (4100, 4100), (40, 90, 160))),
        "upscaler_1": "R-ESRGAN 4x+",
        "upscaling_resize": 1.01,
    }
    with TestClient(create_app(settings, models=store)) as client:
        r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "`upscaler_1` 'R-ESRGAN 4x+' is a 4x model" in detail
    assert "16400x16400" in detail and "268435456 pixels" in detail
