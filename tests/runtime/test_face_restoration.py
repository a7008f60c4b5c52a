"""runtime/face_restoration.py and runtime/face_detection.py on tiny weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import face_detection as fd
from runtime import face_restoration as fr
from runtime.model_source import LocalSource
from runtime.model_store import ModelStore
from runtime.tiny_kinds import make_tiny_face_models, tiny_face_detector, write_state_dict
from sdeks.errors import InvalidParameterError, ModelNotFoundError


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_tiny_face_models(root, codeformer=False)
    return root


@pytest.fixture
def store(faces_dir: Path, tmp_path: Path) -> ModelStore:
    return ModelStore(LocalSource(faces_dir), cache_dir=tmp_path / "cache")


def _image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def test_restorers_and_detector_are_listed_and_loaded_through_the_store(store) -> None:
    assert fr.available(store) == ["GFPGAN"]
    assert fr.items(store)[0]["name"] == "GFPGAN"
    entry = fr.restorer_entry(store, "GFPGAN", "face_restoration_model")
    with store.use_weights(fr.RESTORER, entry) as lease:
        assert lease.model.arch == "GFPGAN" and lease.model.size == 64
    kinds = store.state()["kinds"]
    assert kinds["face restorer"]["ram"] == ["GFPGANv1.4.safetensors"]


def test_restore_changes_pixels_only_inside_detected_faces(store) -> None:
    image = _image(128, seed=1)
    det_entry = fr.detector_entry(store, "restore_faces")
    entry = fr.restorer_entry(store, "GFPGAN", "restore_faces")
    with (
        store.use_weights(fd.FACE_DETECTOR, det_entry) as det,
        store.use_weights(fr.RESTORER, entry) as lease,
    ):
        out, faces = fr.restore_faces(lease.model, det.model, image, max_faces=2)
    assert len(faces) == 2
    import cv2

    inside = np.zeros((128, 128), bool)
    for _face, matrix in faces:
        crop = np.ones((64, 64), np.float32)
        inv = cv2.invertAffineTransform(matrix)
        inside |= cv2.warpAffine(crop, inv, (128, 128), flags=cv2.INTER_NEAREST) > 0
    changed = (np.asarray(out, int) != np.asarray(image, int)).any(axis=2)
    assert changed.any()
    assert not (changed & ~inside).any()  # nothing outside the faces' crops
    assert inside.mean() < 0.9  # and there is an outside to check


def test_no_face_leaves_the_image_unchanged(store, tmp_path: Path) -> None:
    det_path = write_state_dict(
        tiny_face_detector(faces=False), tmp_path / "facedetection/detection_x.safetensors"
    )
    detector = fd.load_face_detector(det_path, fr.detector_entry(store, "x"))
    entry = fr.restorer_entry(store, "GFPGAN", "x")
    image = _image(64)
    with store.use_weights(fr.RESTORER, entry) as lease:
        out, faces = fr.restore_faces(lease.model, detector, image)
    assert faces == [] and np.array_equal(np.asarray(out), np.asarray(image))


def test_restorer_names_fail_clearly(store) -> None:
    with pytest.raises(
        InvalidParameterError, match="`face_restoration_model` 'Nope'.*CodeFormer, GFPGAN"
    ):
        fr.check_restorer(store, "Nope", "face_restoration_model")
    with pytest.raises(ModelNotFoundError, match="no CodeFormer weights.*installed: GFPGAN"):
        fr.check_restorer(store, "CodeFormer", "codeformer_visibility")


def test_missing_detector_is_named(tmp_path: Path) -> None:
    root = tmp_path / "m"
    make_tiny_face_models(root, codeformer=False)
    for p in (root / "facedetection").iterdir():
        p.unlink()
    store = ModelStore(LocalSource(root), cache_dir=tmp_path / "c")
    with pytest.raises(ModelNotFoundError, match="needs a face detector.*facedetection/"):
        fr.check_restorer(store, "GFPGAN", "restore_faces")


def test_detector_reads_published_key_layout(tmp_path: Path) -> None:
    """biubug6's files carry a `module.` prefix and are tensor-only pickles."""
    import torch

    model = tiny_face_detector()
    path = tmp_path / "mobilenet0.25_Final.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    entry = fd.detector_entries(
        [
            fr.restorer_entry.__globals__["ModelEntry"](
                name=path.name, kind="file", key=f"facedetection/{path.name}", files=()
            )
        ]
    )[0]
    loaded = fd.load_face_detector(path, entry)
    faces = fd.detect(loaded, _image(64))
    assert faces and all(f.score > 0.9 for f in faces)


def test_extra_arches_are_looked_up_once_per_process() -> None:
    import importlib.abc
    import sys

    from runtime.face_restoration import _install_extra_arches

    lookups: list[str] = []

    class Recorder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "spandrel_extra_arches":
                lookups.append(name)
            return None  # the real finders decide

    _install_extra_arches.cache_clear()
    recorder = Recorder()
    sys.meta_path.insert(0, recorder)
    try:
        first = [_install_extra_arches() for _ in range(3)]
    finally:
        sys.meta_path.remove(recorder)
    installed = "spandrel_extra_arches" in sys.modules
    assert first == [installed] * 3
    assert len(lookups) <= 1  # at most the first call searches
