"""Without prebuilt URIs the app builds both Dockerfiles as image assets (Docker only at deploy)."""

from __future__ import annotations

import json
from pathlib import Path

import aws_cdk as cdk

from infra.images import REPO_ROOT, Images


def test_images_become_docker_assets_from_the_repo_dockerfiles(tmp_path: Path) -> None:
    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "Images")
    images = Images(stack, "Images", dispatcher_image=None, runtime_image=None)
    assert cdk.Token.is_unresolved(images.dispatcher_uri)
    app.synth()  # stages the build contexts; nothing is built

    assets = json.loads((tmp_path / "Images.assets.json").read_text())["dockerImages"]
    sources = sorted(a["source"]["dockerFile"] for a in assets.values())
    assert sources == ["dispatcher/Dockerfile", "runtime/Dockerfile"]
    assert {a["source"]["platform"] for a in assets.values()} == {"linux/amd64"}
    for asset in assets.values():
        context = tmp_path / asset["source"]["directory"]
        assert (context / asset["source"]["dockerFile"]).is_file()
        assert (context / "pyproject.toml").is_file()
        # the build context leaves out the virtualenv, git and tests
        assert not (context / ".venv").exists() and not (context / ".git").exists()
        assert not (context / "tests").exists()
    assert (REPO_ROOT / "dispatcher" / "Dockerfile").is_file()


def test_prebuilt_image_uris_are_used_as_given() -> None:
    app = cdk.App()
    stack = cdk.Stack(app, "Images")
    images = Images(stack, "Images", dispatcher_image="r/d:1", runtime_image="r/r:1")
    assert (images.dispatcher_uri, images.runtime_uri) == ("r/d:1", "r/r:1")


def _dockerfile(name: str) -> str:
    return (REPO_ROOT / name / "Dockerfile").read_text()


def test_dockerfiles_run_as_the_deployments_user() -> None:
    for name in ("dispatcher", "runtime"):
        assert "\nUSER 10001\n" in _dockerfile(name), name  # runAsUser in infra/k8s.py


def test_runtime_image_is_cuda_and_ships_single_file_configs() -> None:
    text = _dockerfile("runtime")
    base = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert base.startswith("FROM nvidia/cuda:") and "runtime" in base
    assert 'pip install ".[runtime]"' in text
    assert "ENV SDEKS_SHIPPED_CONFIGS=/opt/sdeks/configs" in text


def test_dispatcher_image_carries_no_torch() -> None:
    instructions = "\n".join(
        line for line in _dockerfile("dispatcher").splitlines() if not line.startswith("#")
    )
    assert 'pip install ".[dispatcher]"' in instructions
    assert "torch" not in instructions and "[runtime]" not in instructions
