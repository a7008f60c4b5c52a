"""ADetailer on the tiny checkpoint with a tiny detector that finds red regions."""

from __future__ import annotations

import base64
import io
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime import infotext
from runtime.a1111 import Img2ImgRequest
from runtime.adetailer import parse_args
from runtime.render import DEFAULT_OPTIONS, Renderer
from runtime.settings import RuntimeSettings
from sdeks.errors import InvalidParameterError, ModelLoadError, ModelNotFoundError

OPTIONS = dict(DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def renderer(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    from runtime.detectors import save_tiny_detector
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    root = tmp_path_factory.mktemp("ad-models")
    shutil.copytree(tiny_models_dir, root, dirs_exist_ok=True)
    save_tiny_detector(root / "adetailer" / "red_yolov8n.pt2")
    # An ultralytics pickle (never unpickled here: ultralytics is not installed).
    (root / "adetailer" / "hand_yolov8n.pt").write_bytes(b"not loaded")
    _write_other_vae(root / "Stable-diffusion" / "tiny-sd15" / "vae", root / "VAE")
    cache = tmp_path_factory.mktemp("ad-cache")
    settings = RuntimeSettings(default_model="tiny-sd15", cache_dir=cache)
    return Renderer(ModelStore(LocalSource(root), cache_dir=cache), settings)


def _write_other_vae(like: Path, folder: Path) -> None:
    """A VAE of the tiny checkpoint's shape with other random weights, in `VAE/`."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(7)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(like)))
    folder.mkdir(exist_ok=True)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(folder / "other-vae.safetensors"))


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


def two_regions() -> Image.Image:
    """A pure red cell in the corner (sure, but its box is clipped: small) and a dull red
    cell inside (less sure, full box: large)."""
    image = Image.new("RGB", (64, 64), (90, 110, 100))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 7, 7), fill=(255, 0, 0))
    draw.rectangle((32, 32, 39, 39), fill=(128, 26, 26))
    return image


@pytest.mark.parametrize(("method", "changed"), [("Area", "inside"), ("Confidence", "corner")])
def test_mask_filter_method_picks_the_largest_or_the_surest(renderer, method, changed):
    args = {**AD, "ad_dilate_erode": 0, "ad_mask_k": 1, "ad_mask_filter_method": method}
    before = px(renderer.img2img(request(two_regions()), options=OPTIONS))
    result = renderer.img2img(request(two_regions(), True, args), options=OPTIONS)
    after = px(result)
    regions = {"corner": (slice(0, 12), slice(0, 12)), "inside": (slice(28, 44), slice(28, 44))}
    kept = regions.pop("corner" if changed == "inside" else "inside")
    assert np.array_equal(after[kept], before[kept])
    assert np.abs(after[regions[changed]] - before[regions[changed]]).max() > 10
    params = result.info["extra_generation_params"]
    assert params["ADetailer detections"].startswith("image 1: red_yolov8n.pt2: 1 (")
    assert params["ADetailer method to decide top k masks"] == method


def test_prompt_append_is_the_pass_prompt_with_the_tail(renderer):
    appended = renderer.img2img(
        request(picture(True), {**AD, "ad_prompt_append": "shiny"}), options=OPTIONS
    )
    written = renderer.img2img(
        request(picture(True), {**AD, "ad_prompt": "a cube, shiny"}), options=OPTIONS
    )
    plain = renderer.img2img(request(picture(True), AD), options=OPTIONS)
    assert np.array_equal(px(appended), px(written))
    assert not np.array_equal(px(appended), px(plain))
    assert infotext.parse(appended.infotexts[0])["ADetailer prompt append"] == "shiny"


def test_the_extensions_pt_name_finds_the_exported_pt2(renderer):
    # GIVEN the name every client sends (the extension lists YOLO files as `.pt`)
    result = renderer.img2img(
        request(picture(True), {**AD, "ad_model": "red_yolov8n.pt"}), options=OPTIONS
    )
    detections = result.info["extra_generation_params"]["ADetailer detections"]
    assert detections.startswith("image 1: red_yolov8n.pt: 4 (")
    for name in ("red_yolov8n", "red_yolov8n.pt2"):
        renderer.img2img(request(picture(False), {**AD, "ad_model": name}), options=OPTIONS)


def test_an_ultralytics_pt_without_ultralytics_fails_at_check_time_saying_so(renderer):
    with pytest.raises(ModelLoadError) as info:
        renderer.img2img(
            request(picture(True), {**AD, "ad_model": "hand_yolov8n.pt"}), options=OPTIONS
        )
    assert "ADetailer pass 1" in info.value.message
    assert "detector-ultralytics" in info.value.message and ".pt2" in info.value.message


def test_detectors_are_listed_by_the_names_clients_send(renderer):
    from runtime.detectors import DETECTOR

    with pytest.raises(ModelNotFoundError) as info:
        renderer.models.resolve_weights(DETECTOR, "ghost.pt")
    assert "red_yolov8n.pt" in info.value.message and "red_yolov8n.pt2" not in info.value.message


def test_separate_inpaint_size(renderer):
    plain = renderer.img2img(request(picture(True), AD), options=OPTIONS)
    sized = renderer.img2img(
        request(
            picture(True),
            {
                **AD,
                "ad_use_inpaint_width_height": True,
                "ad_inpaint_width": 32,
                "ad_inpaint_height": 32,
            },
        ),
        options=OPTIONS,
    )
    assert not np.array_equal(px(sized), px(plain))
    # only the region changes, at any inpaint size
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(px(sized)[outside], px(plain)[outside])
    with pytest.raises(InvalidParameterError, match="multiples of 8, got 30x32"):
        renderer.img2img(
            request(
                picture(True),
                {
                    **AD,
                    "ad_use_inpaint_width_height": True,
                    "ad_inpaint_width": 30,
                    "ad_inpaint_height": 32,
                },
            ),
            options=OPTIONS,
        )


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


def test_hires_fix_only_passes_skip_a_render_without_hires(renderer):
    from runtime.a1111 import Txt2ImgRequest

    only_hires = {**AD, "ad_hires_fix_only": True}
    t2i = Txt2ImgRequest(
        prompt="a cube",
        steps=2,
        width=64,
        height=64,
        seed=3,
        alwayson_scripts={"ADetailer": {"args": [True, only_hires]}},
    )
    assert "ADetailer" not in renderer.txt2img(t2i, options=OPTIONS).infotexts[0]
    # img2img has no hires fix: the pass runs
    result = renderer.img2img(request(picture(True), only_hires), options=OPTIONS)
    assert "ADetailer detections" in result.info["extra_generation_params"]


def test_masked_content_and_clip_skip_change_the_pass(renderer):
    plain = px(renderer.img2img(request(picture(True), AD), options=OPTIONS))
    for extra, param in [
        ({"ad_inpaint_masked_content": "latent nothing"}, "ADetailer inpaint masked content"),
        ({"ad_use_clip_skip": True, "ad_clip_skip": 2}, "ADetailer CLIP skip"),
    ]:
        result = renderer.img2img(request(picture(True), {**AD, **extra}), options=OPTIONS)
        assert not np.array_equal(px(result), plain), extra
        assert param in result.info["extra_generation_params"]


# --- the `ad_use_*` switches and `ad_restore_face` ---------------------------------


@contextmanager
def unet_inputs(renderer, checkpoint: str):
    """The first argument (the latents) of every call of `checkpoint`'s shared UNet."""
    with renderer.models.use(checkpoint) as lease:
        unet = lease.pipeline.unet
    seen: list = []
    handle = unet.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_restore_face_runs_the_restorer_on_the_inpainted_region_only(renderer):
    from runtime import face_restoration as fr

    entry = fr.restorer_entry(renderer.models, "GFPGAN", "test")
    with renderer.models.use_weights(fr.RESTORER, entry) as lease:
        net = lease.model.model
    calls: list = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = renderer.img2img(request(picture(True), AD), options=OPTIONS)
        assert calls == []
        restored = renderer.img2img(
            request(picture(True), {**AD, "ad_restore_face": True}), options=OPTIONS
        )
    finally:
        handle.remove()
    assert calls  # the real restorer ran, once per face per mask
    before = px(renderer.img2img(request(picture(True)), options=OPTIONS))
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(px(restored)[outside], before[outside])
    assert not np.array_equal(px(restored), px(plain))
    assert infotext.parse(restored.infotexts[0])["ADetailer restore face"] == "True"


def test_restore_face_without_the_restorer_fails_before_rendering(renderer):
    body = request(picture(True), {**AD, "ad_restore_face": True})
    body.denoising_strength = 0.5  # the first pass would call the UNet
    with unet_inputs(renderer, "tiny-sd15") as seen:
        with pytest.raises(ModelNotFoundError) as info:
            renderer.img2img(body, options={**OPTIONS, "face_restoration_model": "CodeFormer"})
    assert seen == []
    message = info.value.message
    assert "ADetailer pass 1" in message and "`ad_restore_face`" in message
    assert "CodeFormer" in message and "GFPGAN" in message  # what is installed


def _spy_step(monkeypatch, cls_name: str) -> list:
    import diffusers

    cls = getattr(diffusers, cls_name)
    step = cls.step
    configs: list = []

    def spied(self, *a, **k):
        configs.append(dict(self.config))
        return step(self, *a, **k)

    monkeypatch.setattr(cls, "step", spied)
    return configs


def test_separate_sampler_is_the_scheduler_the_pass_steps_with(renderer, monkeypatch):
    ancestral = _spy_step(monkeypatch, "EulerAncestralDiscreteScheduler")
    plain = renderer.img2img(request(picture(True), AD), options=OPTIONS)
    assert ancestral == []
    args = {**AD, "ad_use_sampler": True, "ad_sampler": "Euler a"}
    result = renderer.img2img(request(picture(True), args), options=OPTIONS)
    assert ancestral  # every step of the pass
    assert not np.array_equal(px(result), px(plain))
    params = infotext.parse(result.infotexts[0])
    assert params["ADetailer use separate sampler"] == "True"
    assert params["ADetailer sampler"] == "Euler a"
    assert "ADetailer scheduler" not in params  # "Use same scheduler" is not written


def test_separate_sampler_starts_from_the_checkpoints_own_scheduler_options(renderer, monkeypatch):
    # GIVEN a render on DPM++ 2M Karras (its scheduler carries `use_karras_sigmas`)
    euler = _spy_step(monkeypatch, "EulerDiscreteScheduler")
    body = request(picture(True), {**AD, "ad_use_sampler": True, "ad_sampler": "Euler"})
    body.sampler_name = "DPM++ 2M Karras"
    renderer.img2img(body, options=OPTIONS)
    assert euler and not euler[0]["use_karras_sigmas"]  # plain Euler, not Euler Karras
    euler.clear()
    args = {**AD, "ad_use_sampler": True, "ad_sampler": "Euler", "ad_scheduler": "Karras"}
    result = renderer.img2img(request(picture(True), args), options=OPTIONS)
    assert euler and euler[0]["use_karras_sigmas"]
    assert result.info["extra_generation_params"]["ADetailer scheduler"] == "Karras"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"ad_sampler": "Warp drive"}, "`ad_sampler` 'Warp drive' is not supported"),
        ({"ad_sampler": "Euler", "ad_scheduler": "Wobbly"}, "`ad_scheduler` 'Wobbly'"),
    ],
)
def test_unknown_separate_sampler_is_refused_naming_it(renderer, fields, needle):
    body = request(picture(True), {**AD, "ad_use_sampler": True, **fields})
    with pytest.raises(InvalidParameterError) as info:
        renderer.img2img(body, options=OPTIONS)
    assert "ADetailer pass 1" in info.value.message and needle in info.value.message


@pytest.mark.parametrize("other", ["tiny-sd15-single", "tiny-sdxl"])
def test_separate_checkpoint_inpaints_with_its_own_unet(renderer, other):
    """Another SD 1.x file, and an SDXL checkpoint for an SD 1.x render: both inpaint the
    image (any family's inpaint pipeline takes any image); the render's UNet is idle."""
    plain = renderer.img2img(request(picture(True), AD), options=OPTIONS)
    args = {**AD, "ad_use_checkpoint": True, "ad_checkpoint": other}
    with unet_inputs(renderer, other) as theirs, unet_inputs(renderer, "tiny-sd15") as ours:
        result = renderer.img2img(request(picture(True), args), options=OPTIONS)
    assert theirs and ours == []
    before = px(renderer.img2img(request(picture(True)), options=OPTIONS))
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(px(result)[outside], before[outside])
    if other == "tiny-sdxl":  # the single file holds the same random weights as tiny-sd15
        assert not np.array_equal(px(result), px(plain))
    params = infotext.parse(result.infotexts[0])
    assert params["ADetailer use separate checkpoint"] == "True"
    assert params["ADetailer checkpoint"] == other
    assert result.model is not None and "tiny-sd15" in result.model  # the render's own
    assert not any(other in name for name in renderer.models.state()["in_use"])  # released


def test_unknown_separate_checkpoint_is_model_not_found_naming_it(renderer):
    args = {**AD, "ad_use_checkpoint": True, "ad_checkpoint": "ghost.safetensors"}
    with pytest.raises(ModelNotFoundError) as info:
        renderer.img2img(request(picture(True), args), options=OPTIONS)
    assert "`ad_checkpoint` 'ghost.safetensors'" in info.value.message
    # "Use same checkpoint" (and the render's own name) is the render's checkpoint
    for same in ("Use same checkpoint", "tiny-sd15"):
        renderer.img2img(
            request(picture(False), {**AD, "ad_use_checkpoint": True, "ad_checkpoint": same}),
            options=OPTIONS,
        )


def test_separate_vae_encodes_and_decodes_the_pass(renderer, monkeypatch):
    from runtime import vae as vae_module

    decoded: list = []
    load_vae = vae_module.load_vae

    def spied_load(path, like, device):
        loaded = load_vae(path, like, device)
        loaded.decoder.register_forward_hook(lambda *_: decoded.append(path.name))
        return loaded

    monkeypatch.setattr(vae_module, "load_vae", spied_load)
    plain = renderer.img2img(request(picture(True), AD), options=OPTIONS)
    args = {**AD, "ad_use_vae": True, "ad_vae": "other-vae.safetensors"}
    result = renderer.img2img(request(picture(True), args), options=OPTIONS)
    assert decoded and set(decoded) == {"other-vae.safetensors"}
    assert not np.array_equal(px(result), px(plain))
    params = infotext.parse(result.infotexts[0])
    assert params["ADetailer use separate VAE"] == "True"
    assert params["ADetailer VAE"] == "other-vae.safetensors"
    with pytest.raises(ModelNotFoundError) as info:
        renderer.img2img(
            request(picture(True), {**AD, "ad_use_vae": True, "ad_vae": "ghost.pt"}),
            options=OPTIONS,
        )
    assert "ADetailer pass 1" in info.value.message and "`ad_vae` 'ghost.pt'" in info.value.message


def test_noise_multiplier_scales_the_initial_noise(renderer):
    """The pass's first UNet input is init latents + sigma * m * noise: linear in m."""
    first: dict[float, object] = {}
    for m in (0.5, 1.0, 1.5):
        args = {**AD, "ad_mask_k": 1, "ad_use_noise_multiplier": m != 1.0}
        if m != 1.0:
            args["ad_noise_multiplier"] = m
        with unet_inputs(renderer, "tiny-sd15") as seen:
            result = renderer.img2img(request(picture(True), args), options=OPTIONS)
        first[m] = seen[0]
    up, down = first[1.5] - first[1.0], first[1.0] - first[0.5]
    assert float(up.abs().max()) > 1e-3
    assert float((up - down).abs().max()) < 1e-4
    params = result.info["extra_generation_params"]
    assert params["ADetailer use separate noise multiplier"] is True
    assert params["ADetailer noise multiplier"] == 1.5


def test_mask_bbox_expansion_grows_each_box_before_the_mask(renderer):
    args = {**AD, "ad_mask_k": 1, "ad_dilate_erode": 0}
    before = px(renderer.img2img(request(picture(True)), options=OPTIONS))
    plain = px(renderer.img2img(request(picture(True), args), options=OPTIONS))
    grown = renderer.img2img(
        request(picture(True), {**args, "ad_mask_bbox_expansion": 8}), options=OPTIONS
    )
    ring = np.zeros((64, 64), dtype=bool)
    ring[8:56, 8:56] = True
    ring[20:44, 20:44] = False  # inside every detected box
    assert np.array_equal(plain[ring], before[ring])  # unexpanded: the ring is kept
    assert (px(grown)[ring] != before[ring]).any()  # expanded: it is inpainted too
    outside = np.ones((64, 64), dtype=bool)
    outside[4:60, 4:60] = False
    assert np.array_equal(px(grown)[outside], before[outside])
    assert grown.info["extra_generation_params"]["ADetailer mask bbox expansion"] == 8


def test_infotext_names_each_switch_as_the_extension_writes_it():
    from runtime.adetailer import _params

    (one,) = parse_args(
        {
            "ADetailer": {
                "args": [
                    {
                        **AD,
                        "ad_use_steps": True,
                        "ad_steps": 12,
                        "ad_use_cfg_scale": True,
                        "ad_cfg_scale": 4.5,
                        "ad_use_clip_skip": True,
                        "ad_clip_skip": 2,
                        "ad_use_inpaint_width_height": True,
                        "ad_inpaint_width": 32,
                        "ad_inpaint_height": 48,
                        "ad_x_offset": 3,
                        "ad_mask_merge_invert": "Merge",
                        "ad_use_sampler": True,
                        "ad_sampler": "Euler",
                        "ad_scheduler": "Use same scheduler",
                    }
                ]
            }
        }
    )
    params = _params(one)
    assert params["ADetailer use separate steps"] is True and params["ADetailer steps"] == 12
    assert params["ADetailer use separate CFG scale"] is True
    assert params["ADetailer CFG scale"] == 4.5
    assert params["ADetailer use separate CLIP skip"] is True
    assert params["ADetailer CLIP skip"] == 2
    assert params["ADetailer use inpaint width height"] is True
    assert (params["ADetailer inpaint width"], params["ADetailer inpaint height"]) == (32, 48)
    assert params["ADetailer x offset"] == 3 and "ADetailer y offset" not in params
    assert params["ADetailer mask merge invert"] == "Merge"
    assert params["ADetailer sampler"] == "Euler" and "ADetailer scheduler" not in params
    assert "ADetailer use separate checkpoint" not in _params(
        parse_args({"ADetailer": {"args": [AD]}})[0]
    )
