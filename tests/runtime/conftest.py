"""Shared runtime fixtures: tiny random models, built once per session.

Each fixture returns a path that tests must treat as read-only (copy it
before changing it); `tiny_models_dir` lays them out as a models bucket.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The tiny models are far too small for intra-op threads to pay: on the 2-core
# CI machine, with other test processes running, torch's default threads spin
# against each other and the same tests take 4x longer. Set before torch is
# imported where possible, and again below for a torch imported earlier.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread() -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x diffusers folder (seed 0)."""
    from runtime.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-sd15", family="sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL diffusers folder (seed 0)."""
    from runtime.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="session")
def tiny_sd15_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `tiny_sd15_dir` as one LDM-layout `.safetensors`,
    with its `tiny-sd15-single.config/` folder beside it."""
    from runtime.tiny import make_tiny

    return make_tiny(
        tmp_path_factory.mktemp("tiny") / "tiny-sd15-single", family="sd15", single_file=True
    )


@pytest.fixture(scope="session")
def tiny_models_dir(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_sd15_dir: Path,
    tiny_sdxl_dir: Path,
    tiny_sd15_file: Path,
) -> Path:
    """A models folder in the bucket layout: two diffusers folders and a single file.

    Stable-diffusion/tiny-sd15/            (diffusers folder)
    Stable-diffusion/tiny-sdxl/            (diffusers folder)
    Stable-diffusion/tiny-sd15-single.safetensors (+ tiny-sd15-single.config/)
    Lora/   VAE/                           (empty)
    RealESRGAN/ ESRGAN/ SwinIR/ GFPGAN/ facedetection/   tiny upscalers, restorer, detector
                         (GFPGAN only: tests/runtime/test_codeformer.py makes its own bucket)
    """
    from runtime.tiny import single_file_config_dir
    from runtime.tiny_kinds import make_tiny_face_models, make_tiny_upscalers

    root = tmp_path_factory.mktemp("models")
    ckpt = root / "Stable-diffusion"
    ckpt.mkdir()
    shutil.copytree(tiny_sd15_dir, ckpt / tiny_sd15_dir.name)
    shutil.copytree(tiny_sdxl_dir, ckpt / tiny_sdxl_dir.name)
    shutil.copy2(tiny_sd15_file, ckpt / tiny_sd15_file.name)
    config = single_file_config_dir(tiny_sd15_file)
    shutil.copytree(config, ckpt / config.name)
    (root / "Lora").mkdir()
    (root / "VAE").mkdir()
    make_tiny_upscalers(root)
    make_tiny_face_models(root, codeformer=False)
    return root


@pytest.fixture(scope="session")
def tiny_models_bucket(moto_endpoint: str, tiny_models_dir: Path) -> str:
    """A bucket on the session's moto server holding `tiny_models_dir` (read-only:
    tests that add or change objects make their own bucket).

    Objects are uploaded with a SHA256 checksum, as `aws s3 cp
    --checksum-algorithm SHA256` would, so the disk tier can verify them.
    """
    import uuid

    from sdeks import aws

    s3 = aws.client("s3", endpoint_url=moto_endpoint)
    bucket = f"tiny-models-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for path in sorted(tiny_models_dir.rglob("*")):
        if path.is_file():
            s3.upload_file(
                str(path),
                bucket,
                path.relative_to(tiny_models_dir).as_posix(),
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
            )
    return bucket


def pod_app(stack, aws, models_dir: Path, tmp_path: Path, **settings: Any) -> Any:
    """The pod app (runtime.app.create_app) over moto's stack, serving `models_dir`.

    `settings` override the RuntimeSettings fields (pod_token, slots, task_table, ...).
    """
    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.outputs import OutputWriter
    from runtime.settings import RuntimeSettings

    fields: dict[str, Any] = {
        "callback_topic_arn": stack.callback_topic_arn,
        "output_bucket": stack.output_bucket,
        "runtime": "sdruntime",
        "default_model": "tiny-sd15",
        "models": str(models_dir),
        "device": "cpu",
        "pod_name": "pod-a",
    }
    writer = OutputWriter(s3=aws.s3, bucket=stack.output_bucket)
    store = ModelStore(LocalSource(models_dir), cache_dir=tmp_path / "cache")
    return create_app(RuntimeSettings(**{**fields, **settings}), models=store, writer=writer)


class CallbackQueue:
    """The callback topic read through a `CallbackListener` queue (raw delivery, so
    message attributes arrive as SQS attributes): call it for what arrived within 1 s."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self.queue_url: str = listener.queue_url

    def __call__(self) -> list[Any]:
        from sdeks.callback import Callback

        answer = self.listener.sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        return [Callback.model_validate_json(m["Body"]) for m in answer.get("Messages", [])]


@pytest.fixture
def callbacks(stack, aws) -> Iterator[CallbackQueue]:
    """A queue subscribed to the callback topic for the test's duration."""
    from sdeks.client import CallbackListener

    with CallbackListener(aws.sns, aws.sqs, stack.callback_topic_arn) as listener:
        yield CallbackQueue(listener)
