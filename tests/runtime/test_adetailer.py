"""ADetailer on the tiny checkpoint with a tiny detector that finds red regions."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime import infotext
from runtime.a1111 import Img2ImgRequest
from runtime.adetailer import parse_args
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.settings import RuntimeSettings
from sdeks.errors import InvalidParameterError, ModelNotFoundError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.detectors import save_tiny_detector
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    root = tmp_path_factory.mktemp("ad-models")
    shutil.copytree(tiny_models_dir, root, dirs_exist_ok=True)
    save_tiny_detector(root / "adetailer" / "red_yolov8n.pt2")
    cache = tmp_path_factory.mktemp("ad-cache")
    settings = RuntimeSettings(default_model="tiny-sd15", cache_dir=cache)
    return Renderer(ModelStore(LocalSource(root), cache_dir=cache), settings)


def picture(red: bool) -> Image.Image:
    image = Image.new("RGB", (64, 64), (90, 110, 100))
    ImageDraw.Draw(image).rectangle((24, 24, 39, 39), fill=(255, 0, 0) if red else (0, 0, 255))
    return image


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request(image: Image.Image, *args) -> Img2ImgRequest:
    # Denoising strength 0: the first pass returns the init image, so only ADetailer acts.
    scripts = {"ADetailer": {"args": list(args)}} if args else {}
    return Img2ImgRequest(
        prompt="a cube",
        steps=4,
        width=64,
        height=64,
        seed=3,
        denoising_strength=0.0,
        init_images=[b64(image)],
        alwayson_scripts=scripts,
    )


def px(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


AD = {"ad_model": "red_yolov8n.pt2", "ad_mask_blur": 0, "ad_denoising_strength": 0.9}


def test_only_the_detected_region_changes(renderer):
    before = px(renderer.img2img(request(picture(True)), options=OPTIONS))
    result = renderer.img2img(request(picture(True), True, AD), options=OPTIONS)
    after = px(result)
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, 16:48] = False  # the boxes (20..44) dilated by ad_dilate_erode=4
    assert np.array_equal(after[outside], before[outside])
    assert np.abs(after[24:40, 24:40] - before[24:40, 24:40]).max() > 10
    params = infotext.parse(result.infotexts[0])
    assert params["ADetailer model"] == "red_yolov8n.pt2"
    assert params["ADetailer detections"].startswith("image 1: red_yolov8n.pt2: 4 (")
    assert result.info["extra_generation_params"]["ADetailer denoising strength"] == 0.9


def test_nothing_detected_leaves_the_image_and_says_so(renderer):
    before = px(renderer.img2img(request(picture(False)), options=OPTIONS))
    result = renderer.img2img(request(picture(False), AD), options=OPTIONS)
    assert np.array_equal(px(result), before)
    assert result.info["extra_generation_params"]["ADetailer detections"] == (
        "image 1: red_yolov8n.pt2: 0"
    )


@pytest.mark.parametrize(
    "args", [[False], [False, AD], [True, False, {"ad_model": "None"}], []], ids=str
)
def test_switched_off_adetailer_is_a_no_op(renderer, args):
    before = px(renderer.img2img(request(picture(True)), options=OPTIONS))
    result = renderer.img2img(request(picture(True), *args), options=OPTIONS)
    assert np.array_equal(px(result), before)
    assert "ADetailer" not in result.infotexts[0]


def test_args_layout_and_defaults():
    (one,) = parse_args({"ADetailer": {"args": [True, False, {"ad_model": "face_yolov8n.pt"}]}})
    assert (one.ad_confidence, one.ad_dilate_erode, one.ad_mask_blur) == (0.3, 4, 4)
    assert (one.ad_denoising_strength, one.ad_inpaint_only_masked_padding) == (0.4, 32)
    assert parse_args({"adetailer": {"args": [{"ad_model": "None"}]}}) == []


@pytest.mark.parametrize(
    ("arg", "error", "needle"),
    [
        ({"ad_model": "nope.pt"}, ModelNotFoundError, "'nope.pt'"),
        ({"ad_model": "red_yolov8n.pt2", "ad_colour": 1}, InvalidParameterError, "ad_colour"),
        (
            {"ad_model": "red_yolov8n.pt2", "ad_confidence": 2},
            InvalidParameterError,
            "ad_confidence",
        ),
    ],
)
def test_bad_args_fail_naming_them(renderer, arg, error, needle):
    with pytest.raises(error) as info:
        renderer.img2img(request(picture(True), arg), options=OPTIONS)
    assert needle in info.value.message


def test_cancel_stops_a_mask_inpaint_between_its_steps(renderer, monkeypatch):
    """A cancel arriving while a mask is inpainted stops that inpaint at its next step
    (as the task time limit does: both are `JobControl.check`), not after every mask."""
    from runtime import families
    from runtime.control import JobControl
    from sdeks.errors import TaskCancelledError

    control = JobControl(job_id="ad-cancel")
    steps: list[int] = []
    derive = families.derive

    def cancelling_derive(pipe, family, kind, **overrides):
        made = derive(pipe, family, kind, **overrides)
        if kind == "inpaint":
            step = made.scheduler.step

            def counted(*a, **k):
                steps.append(1)
                control.cancel()  # the user cancels during the first mask's first step
                return step(*a, **k)

            made.scheduler.step = counted
        return made

    monkeypatch.setattr(families, "derive", cancelling_derive)
    with pytest.raises(TaskCancelledError):
        renderer.img2img(request(picture(True), AD), options=OPTIONS, control=control)
    assert len(steps) == 1  # not the first mask's every step
