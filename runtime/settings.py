"""Runtime pod settings, read once at start-up from `SDEKS_*` variables.

`python -m runtime --models ... --device ...` overrides the matching fields.
Importing this module must not import torch (the dispatcher and the local
stack read these names too).

`callback_topic_arn` and `output_bucket` are optional here, unlike the other
services: a pod started standalone serves the A1111 API without any AWS, and
answers `POST /v1/jobs` with 503 until both are set.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field

from sdeks.settings import ServiceSettings

GiB = 2**30


class RuntimeSettings(ServiceSettings):
    callback_topic_arn: str | None = None  # type: ignore[assignment]
    output_bucket: str | None = None  # type: ignore[assignment]

    #: This pod's runtime name (goes into every callback).
    runtime: str = "sdruntime"
    #: This pod's name in the task table (`pod`); Kubernetes sets HOSTNAME to the pod name.
    pod_name: str = Field(default_factory=socket.gethostname)
    #: Publish a `running` callback when rendering starts (docs/lifecycle.md).
    publish_running: bool = False
    #: Idempotency window of the task table (same default as the dispatcher's).
    task_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    #: `s3://BUCKET[/PREFIX]` or a local directory holding `Stable-diffusion/`, `Lora/`, `VAE/`.
    models: str | None = None
    #: Checkpoint used when a task names none (A1111 naming).
    default_model: str | None = None
    #: Load the default model into RAM in the background at start-up.
    warm_default_model: bool = True
    #: False pins the pod to `default_model`: a task naming another checkpoint fails
    #: (`invalid_parameter`) instead of switching models (the runtime's `dynamicModel`).
    dynamic_models: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Weights dtype on CUDA; CPU always runs float32.
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    #: Local disk cache for models fetched from S3.
    cache_dir: Path = Path("/tmp/sdeks-models")
    #: MiB per ranged GET of a model download; 0 = one GET per object (for
    #: backends that read the whole object to serve a range, like moto).
    s3_part_mib: int = Field(default=16, ge=0, le=5 * 1024)
    #: Ranged GETs of one file in flight at once.
    s3_concurrency: int = Field(default=8, ge=1, le=64)
    #: Tier budgets of the model store (bytes); GPU None: all GPU memory less the reserve.
    disk_cache_bytes: int = Field(default=200 * GiB, ge=0)
    ram_cache_bytes: int = Field(default=48 * GiB, ge=0)
    gpu_cache_bytes: int | None = Field(default=None, ge=0)
    gpu_reserve_bytes: int = Field(default=8 * GiB, ge=0)
    #: Per-family diffusers config folders shipped in the image, for single-file checkpoints.
    shipped_configs: Path | None = None
    channels_last: bool = False

    #: Jobs rendered at once; the pod answers 429 beyond this.
    slots: int = Field(default=1, ge=1, le=16)
    #: When a job ends, the dispatcher replica that sent it has first call on the pod
    #: this long: another replica's job that would switch the model gets 429 `reserved`
    #: (`sdeks.grace`, docs/dispatcher.md). 0 turns it off.
    first_call_s: float = Field(default=0.3, ge=0, le=5)
    #: Largest width x height accepted (2048 x 2048 by default).
    max_pixels: int = Field(default=2048 * 2048, ge=64 * 64)
    max_steps: int = Field(default=150, ge=1)
    #: Prompt cap in chunks of 75 tokens (each of `prompt` and `negative_prompt`).
    max_prompt_chunks: int = Field(default=256, ge=1)
    #: A job rendering longer than this stops between steps and ends with one `timeout`
    #: callback. Keep it under the dispatcher's `SDEKS_JOB_TIMEOUT_S`, which otherwise
    #: gives up on the pod and retries elsewhere.
    task_time_limit_s: float | None = Field(default=900.0, gt=0)
    #: Largest batch_size x n_iter.
    max_images: int = Field(default=16, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    #: Largest upscaled output of extra-single-image, in pixels.
    max_upscale_pixels: int = Field(default=4096 * 4096, ge=64 * 64)

    #: Decode with VAE tiling when width x height is above this (saves GPU memory).
    vae_tiling_pixels: int = Field(default=1024 * 1024, ge=0)
    #: `torch.compile` the UNet on CUDA (slow first job, faster after).
    compile: bool = False
    #: torch CPU threads (None: torch's default, one per core).
    torch_threads: int | None = Field(default=None, ge=1)
