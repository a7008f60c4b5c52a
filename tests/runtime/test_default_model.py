"""A pod started without SDEKS_DEFAULT_MODEL uses its first checkpoint, as A1111
always has one loaded; models are named after their folders."""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime.settings import RuntimeSettings


def test_a_pod_without_a_default_model_uses_its_first_checkpoint(
    tiny_sd15_dir: Path, tmp_path: Path
):
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    models = tmp_path / "models"
    shutil.copytree(tiny_sd15_dir, models / "Stable-diffusion" / "b-second")
    shutil.copytree(tiny_sd15_dir, models / "Stable-diffusion" / "a-first")
    store = ModelStore(LocalSource(models), cache_dir=tmp_path / "cache")
    settings = RuntimeSettings(warm_default_model=False)
    assert settings.default_model is None

    with TestClient(create_app(settings, models=store)) as client:
        assert client.get("/v1/state").json()["default_model"] == "a-first"
        # A request that names no checkpoint renders (it used to fail `model_not_found`).
        answer = client.post(
            "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64}
        )
        assert answer.status_code == 200, answer.text
        assert "a-first" in answer.json()["info"]


def test_first_checkpoint_is_none_without_checkpoints(tmp_path: Path):
    from runtime.model_catalog import first_checkpoint
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore

    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    store = ModelStore(LocalSource(tmp_path / "models"), cache_dir=tmp_path / "cache")
    assert first_checkpoint(store) is None
