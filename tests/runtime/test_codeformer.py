"""CodeFormer end to end on the tiny random CodeFormer: the loader, the fidelity weight,
`restore_faces` in txt2img, extras, and bad files.

CodeFormer's architecture is in spandrel-extra-arches, an opt-in install (its licence
is non-commercial, docs/models.md): without it these tests skip."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("spandrel_extra_arches")

from runtime import codeformer_arch
from runtime import face_detection as fd
from runtime import face_restoration as fr
from runtime.model_source import LocalSource
from runtime.model_store import ModelStore
from runtime.tiny_kinds import CODEFORMER_KEY, make_tiny_face_models
from sdeks.errors import ModelLoadError


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cf-faces")
    make_tiny_face_models(root, codeformer=True)
    return root


@pytest.fixture
def store(faces_dir: Path, tmp_path: Path) -> ModelStore:
    return ModelStore(LocalSource(faces_dir), cache_dir=tmp_path / "cache")


def _image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _codeformer_class():
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    return CodeFormer


def test_tiny_codeformer_is_detected_as_codeformer_and_sized_from_its_shapes(
    faces_dir: Path, store: ModelStore
) -> None:
    from safetensors.torch import load_file
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormerArch

    path = faces_dir / CODEFORMER_KEY
    assert path.stat().st_size < 3_000_000
    state = load_file(str(path))
    assert CodeFormerArch().detect(state)  # spandrel's own detection, as for published files
    assert codeformer_arch.read_layout(state) == (64, 32, (1, 1, 1), 1, (16,))
    assert fr.available(store) == ["CodeFormer", "GFPGAN"]
    entry = fr.restorer_entry(store, "CodeFormer", "face_restoration_model")
    assert entry.key == CODEFORMER_KEY
    with store.use_weights(fr.RESTORER, entry) as lease:
        assert lease.model.arch == "CodeFormer" and lease.model.size == 64
        assert isinstance(lease.model.model, _codeformer_class())
    assert store.state()["kinds"]["face restorer"]["ram"] == ["codeformer-v0.1.0.safetensors"]


def test_published_layout_is_left_to_spandrel_and_matches_the_class_tables() -> None:
    """A published-size CodeFormer (built on the meta device: shapes only) is read as the
    published layout, so `from_state_dict` leaves it to spandrel's loader; and the fuse
    tables computed for that layout are the class's own."""
    import torch

    with torch.device("meta"):
        published = _codeformer_class()(
            dim_embd=512, n_layers=9, codebook_size=1024, connect_list=["32", "64", "128", "256"]
        )
    state = published.state_dict()
    assert codeformer_arch.read_layout(state) == codeformer_arch.PUBLISHED_LAYOUT
    assert codeformer_arch.from_state_dict(state) is None
    encoder, generator, channels = codeformer_arch.fuse_blocks(codeformer_arch.PUBLISHED_LAYOUT)
    assert encoder == published.fuse_encoder_block
    assert generator == published.fuse_generator_block
    assert channels == published.channels


def test_codeformer_restores_only_inside_faces_and_its_weight_reaches_the_forward(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    cls = _codeformer_class()
    seen: list[float] = []
    forward = cls.forward

    def recording(self, x, weight=0.5, **kwargs):
        seen.append(weight)
        return forward(self, x, weight, **kwargs)

    monkeypatch.setattr(cls, "forward", recording)
    image = _image(128, seed=1)
    det_entry = fr.detector_entry(store, "restore_faces")
    entry = fr.restorer_entry(store, "CodeFormer", "restore_faces")
    outs = {}
    with (
        store.use_weights(fd.FACE_DETECTOR, det_entry) as det,
        store.use_weights(fr.RESTORER, entry) as lease,
    ):
        for weight in (0.1, 0.9):
            outs[weight], faces = fr.restore_faces(
                lease.model, det.model, image, weight=weight, max_faces=2
            )
    assert seen == [0.1, 0.1, 0.9, 0.9]  # two faces, each weight as given
    inside = np.zeros((128, 128), bool)
    for _face, matrix in faces:
        inv = cv2.invertAffineTransform(matrix)
        inside |= (
            cv2.warpAffine(np.ones((64, 64), np.float32), inv, (128, 128), flags=cv2.INTER_NEAREST)
            > 0
        )
    low, high, src = (np.asarray(x, int) for x in (outs[0.1], outs[0.9], image))
    changed = (low != src).any(axis=2)
    assert changed.any() and not (changed & ~inside).any()
    assert inside.mean() < 0.9
    assert np.abs(low - high).mean() > 0.5  # the weight changes the result


def test_codeformer_is_loaded_once_and_leased_per_request(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[int] = []
    build = codeformer_arch.from_state_dict

    def counting(state):
        loads.append(1)
        return build(state)

    monkeypatch.setattr(codeformer_arch, "from_state_dict", counting)
    image = _image(64, seed=2)
    first = fr.restore(store, image, "CodeFormer", weight=0.3)
    second = fr.restore(store, image, "CodeFormer", weight=0.3)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    # GFPGAN's load also asks `from_state_dict` (and gets None): one call per file.
    assert len(loads) == 1
    state = store.state()
    assert state["kinds"]["face restorer"]["ram"] == ["codeformer-v0.1.0.safetensors"]
    assert state["in_use"] == []


def test_corrupt_codeformer_file_fails_as_model_load_failed_naming_it(
    faces_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "m"
    shutil.copytree(faces_dir, root)
    (root / CODEFORMER_KEY).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + bytes(64))
    store = ModelStore(LocalSource(root), cache_dir=tmp_path / "c")
    with pytest.raises(ModelLoadError, match=r"codeformer-v0\.1\.0\.safetensors") as info:
        fr.restore(store, _image(64), "CodeFormer")
    assert info.value.code == "model_load_failed"
    assert store.state()["in_use"] == []
    # A CodeFormer-looking file with tensors of the wrong shapes: the same, not a crash.
    from safetensors.torch import load_file, save_file

    state = load_file(str(faces_dir / CODEFORMER_KEY))
    state["feat_emb.weight"] = state["feat_emb.weight"][:, :7].contiguous()
    save_file(state, str(root / CODEFORMER_KEY))
    store = ModelStore(LocalSource(root), cache_dir=tmp_path / "c2")
    with pytest.raises(ModelLoadError, match=r"codeformer-v0\.1\.0\.safetensors") as info:
        fr.restore(store, _image(64), "CodeFormer")
    assert info.value.code == "model_load_failed"


# --- through the A1111 API -------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_sd15_dir: Path, faces_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.settings import RuntimeSettings

    root = tmp_path_factory.mktemp("cf-models")
    shutil.copytree(tiny_sd15_dir, root / "Stable-diffusion" / tiny_sd15_dir.name)
    shutil.copytree(faces_dir, root, dirs_exist_ok=True)
    settings = RuntimeSettings(default_model="tiny-sd15", models=str(root))
    store = ModelStore(LocalSource(root), cache_dir=tmp_path_factory.mktemp("cf-cache"))
    with TestClient(create_app(settings, models=store)) as test_client:
        yield test_client


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), float)


TXT2IMG = {"prompt": "a face", "steps": 2, "width": 64, "height": 64, "seed": 3}


def _txt2img(client, **extra) -> dict:
    r = client.post("/sdapi/v1/txt2img", json={**TXT2IMG, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_restore_faces_with_codeformer_in_txt2img(client) -> None:
    plain = _txt2img(client)
    cf = _txt2img(
        client, restore_faces=True, override_settings={"face_restoration_model": "CodeFormer"}
    )
    gfpgan = _txt2img(
        client, restore_faces=True, override_settings={"face_restoration_model": "GFPGAN"}
    )
    a, c, g = (_decode(x["images"][0]) for x in (plain, cf, gfpgan))
    assert np.abs(c - a).mean() > 1 and np.abs(c - g).mean() > 1
    assert "Face restoration: CodeFormer" in cf["info"]
    assert "Face restoration: GFPGAN" in gfpgan["info"]
    # No restorer chosen and both installed: CodeFormer, A1111's default.
    default = _txt2img(client, restore_faces=True)
    assert "Face restoration: CodeFormer" in default["info"]
    assert default["images"][0] == cf["images"][0]


def test_code_former_weight_reaches_codeformer_from_override_and_options(client) -> None:
    def restored(**opts) -> dict:
        return _txt2img(
            client,
            restore_faces=True,
            override_settings={"face_restoration_model": "CodeFormer", **opts},
        )

    low, high = restored(code_former_weight=0.1), restored(code_former_weight=0.9)
    assert np.abs(_decode(low["images"][0]) - _decode(high["images"][0])).mean() > 0.5
    assert "CodeFormer weight: 0.1" in low["info"] and "CodeFormer weight: 0.9" in high["info"]
    # The same option set through /sdapi/v1/options serves requests that do not override it.
    before = client.get("/sdapi/v1/options").json().get("code_former_weight", 0.5)
    assert client.post("/sdapi/v1/options", json={"code_former_weight": 0.9}).status_code == 200
    try:
        via_options = restored()
    finally:
        client.post("/sdapi/v1/options", json={"code_former_weight": before})
    assert via_options["images"][0] == high["images"][0]
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**TXT2IMG, "restore_faces": True, "override_settings": {"code_former_weight": 2}},
    )
    assert r.status_code in (400, 422) and "code_former_weight" in r.text


def _extras(client, image: Image.Image, **body) -> dict:
    r = client.post(
        "/sdapi/v1/extra-single-image",
        json={"image": _b64(image), "upscaling_resize": 1, **body},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_extras_codeformer_visibility_blends_and_weight_is_used(client) -> None:
    image = _image(64, seed=4)
    full = _extras(client, image, codeformer_visibility=1, codeformer_weight=0.2)
    half = _extras(client, image, codeformer_visibility=0.5, codeformer_weight=0.2)
    other = _extras(client, image, codeformer_visibility=1, codeformer_weight=0.8)
    a, f, h, o = np.asarray(image, float), *(_decode(x["image"]) for x in (full, half, other))
    assert np.abs(f - a).mean() > 1
    np.testing.assert_allclose(h, (a + f) / 2, atol=1.5)
    assert np.abs(f - o).mean() > 0.5
    assert "CodeFormer visibility: 0.5, CodeFormer weight: 0.2" in half["html_info"]


def test_face_restorers_route_lists_codeformer(client) -> None:
    names = [i["name"] for i in client.get("/sdapi/v1/face-restorers").json()]
    assert names == ["CodeFormer", "GFPGAN"]
