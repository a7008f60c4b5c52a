"""GPU throughput: plain diffusers against the runtime's render path, and the FLOP floor.

The model is Stable Diffusion 1.5's architecture with random weights, built
from its configs written here (UNet 320/640/1280/1280 with 768-wide cross
attention, VAE 128/256/512/512, the CLIP ViT-L/14 text encoder), nothing
from a hub: the same FLOPs as the real model. (`--model tiny` takes the tiny
model of `runtime.tiny` instead, for CPU smoke runs.) The tokenizer is the
tiny in-code CLIP BPE tokenizer; prompts are padded to 77 tokens either way.

Paths, each at batch 1 and 4 (`--batches`), `--steps` steps, classifier-free
guidance 7.5, `--size` x `--size` pixels, PIL images out:

    plain diffusers   StableDiffusionPipeline with its defaults: float32 weights,
                      its default attention processor (SDPA on torch 2), PNDM,
                      `num_images_per_prompt` = batch
    runtime           `runtime.render.Renderer.txt2img` - the pod's own path
                      (A1111 prompt encoding, seeded noise per image, Euler, one
                      `batch_size` request = a batch) - over the weights as the
                      model store puts them on the device (`clone_pipeline` to
                      SDEKS_DTYPE, float16; float32 on CPU as the store does)
    runtime tuned     the same with SDEKS_CHANNELS_LAST and, with `--compile` on
                      CUDA, SDEKS_COMPILE (torch.compile of the UNet; the warm-up
                      run pays the compile)

A `Models` double serves the resident pipeline to the Renderer: loading
(S3/disk/RAM) is model_switch.py's subject, not this one's. The runtime does
not batch separate tasks together; batch 4 is one job with batch_size 4.

FLOP floor: FLOPs per image counted with `torch.utils.flop_counter` on this
architecture (meta tensors, nothing computed) - steps x one UNet call on
the CFG batch + one VAE decode + the text encoder - over the device's peak:
`--peak-tflops`, else 790 TFLOP/s on an H100 (the issue's sustained bf16/fp16
figure), else a dense matmul measured here in the run's dtype (said so).
Counted the issue's way (convolutions and linear layers: 1.354 TFLOP per
UNet step, 2.48 per VAE decode, 43.1 per 512x512 image at 30 steps) and with
the attention matmuls too (which the issue's count leaves out).

    python benchmarks/gpu_inference.py --device cuda --compile   # SD 1.5, 512x512, 30 steps
    python benchmarks/gpu_inference.py --quick                   # tiny model, 64x64, 4 steps, CPU
    python benchmarks/gpu_inference.py --device cpu --size 128 --steps 2 --batches 1

The last line is the headline:
`runtime/plain images/s at batch B: X.XX (runtime at P% of the FLOP floor)`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from benchmarks._common import machine, table

PROMPT = "a photo of a cat wizard, detailed, studio light"
#: The issue's sustained bf16/fp16 dense throughput of an H100.
H100_TFLOPS = 790.0


# --- the model --------------------------------------------------------------------


def sd15_configs() -> dict[str, dict[str, Any]]:
    """Stable Diffusion 1.5's component configs (v1-inference.yaml, as diffusers writes them)."""
    return {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=(
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
    }


def _random_(module: Any, seed: int) -> Any:
    """Fill uninitialised (`to_empty`) weights: fan-in scaled normals, unit norms, zero biases."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                fan_in = param[0].numel()
                values = torch.randn(param.shape, generator=generator) / fan_in**0.5
                param.copy_(values.to(param.device, param.dtype))
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return module.eval().requires_grad_(False)


def build_sd15(device: str, seed: int = 0) -> Any:
    """SD 1.5 with random weights, float32, on `device` (weights made there, never on the hub)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from runtime.tiny import make_tokenizer

    configs = sd15_configs()
    tokenizer = make_tokenizer()
    vocab = tokenizer.get_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    with init_empty_weights():
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
    unet = _random_(unet.to_empty(device=device), seed)
    vae = _random_(vae.to_empty(device=device), seed + 1)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        **configs["text_encoder"], bos_token_id=bos, eos_token_id=eos, pad_token_id=eos
    )
    text_encoder = CLIPTextModel(text_config).to(device).eval().requires_grad_(False)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(model: str, device: str) -> Any:
    if model == "sd15":
        return build_sd15(device)
    from runtime.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15").to(device)


# --- FLOPs ---------------------------------------------------------------------------


def count_flops(pipe: Any, size: int, steps: int) -> dict[str, float]:
    """FLOPs per image (batch 1, CFG), counted on meta copies of `pipe`'s modules.

    `issue`: convolutions and linear layers only (how the issue counted:
    its 1.354 TFLOP per UNet step leaves out the attention matmuls);
    `all`: everything the counter sees, attention matmuls included.
    """
    import torch
    from accelerate import init_empty_weights
    from torch.utils.flop_counter import FlopCounterMode

    def meta(module: Any) -> Any:
        with init_empty_weights():
            if hasattr(module, "from_config"):
                return type(module).from_config(module.config)
            return type(module)(module.config)

    unet, vae, text = meta(pipe.unet), meta(pipe.vae), meta(pipe.text_encoder)
    factor = pipe.vae_scale_factor
    latent = (unet.config.in_channels, size // factor, size // factor)
    width = text.config.hidden_size
    parts: dict[str, dict[str, float]] = {}
    with torch.device("meta"), torch.no_grad():
        for name, call in (
            (
                "unet",
                lambda: unet(
                    torch.randn(2, *latent),
                    torch.tensor([500, 500]),
                    encoder_hidden_states=torch.randn(2, 77, width),
                ),
            ),
            ("vae", lambda: vae.decode(torch.randn(1, vae.config.latent_channels, *latent[1:]))),
            ("text", lambda: text(torch.zeros(2, 77, dtype=torch.long))),
        ):
            with FlopCounterMode(display=False) as counter:
                call()
            counts = counter.get_flop_counts()["Global"]
            total = float(sum(counts.values()))
            parts[name] = {"all": total, "issue": total - float(counts.get(torch.ops.aten.bmm, 0))}
    return {
        key: steps * parts["unet"][key] + parts["vae"][key] + parts["text"][key]
        for key in ("all", "issue")
    } | {"unet_step": parts["unet"]["issue"], "vae": parts["vae"]["issue"]}


def measured_peak(device: str, dtype: Any) -> float:
    """Best dense matmul throughput (FLOP/s) of `device` in `dtype`, measured now."""
    import torch

    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - started))
    return best


def si(flop: float) -> str:
    """FLOP with an SI prefix: 43.1 TFLOP, 1.25 GFLOP."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flop >= scale:
            return f"{flop / scale:.3g} {prefix}FLOP"
    return f"{flop:.3g} FLOP"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --- the two paths --------------------------------------------------------------------


class ResidentModels:
    """`runtime.models.Models` serving one pipeline already on the device (no loading)."""

    def __init__(self, pipe: Any, device: str, name: str) -> None:
        self.pipe = pipe
        self.device = device
        self.name = name

    @contextlib.contextmanager
    def use(self, requested: str, kind: str = "txt2img") -> Iterator[Any]:
        from runtime.families import Family, derive
        from runtime.model_store import LoadTimings, ModelLease

        family = Family("sd1")
        yield ModelLease(
            name=self.name,
            title=self.name,
            hash=None,
            sha256=None,
            family=family,
            kind=kind,  # type: ignore[arg-type]
            pipeline=derive(self.pipe, family, kind),  # type: ignore[arg-type]
            timings=LoadTimings(found_in="gpu"),
            device=self.device,
        )

    def fetch_vae(self, name: str) -> Path:
        raise NotImplementedError("no VAEs here")

    def fetch_lora(self, name: str) -> Path:
        raise NotImplementedError("no LoRAs here")


def plain_call(pipe: Any, args: argparse.Namespace, batch: int, device: str) -> Any:
    import torch

    def run() -> None:
        pipe(
            prompt=PROMPT,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
            guidance_scale=7.5,
            num_images_per_prompt=batch,
            generator=torch.Generator(device=device).manual_seed(0),
            output_type="pil",
        )

    return run


def runtime_call(renderer: Any, args: argparse.Namespace, batch: int) -> Any:
    from runtime.a1111 import Txt2ImgRequest
    from runtime.render import DEFAULT_OPTIONS

    request = Txt2ImgRequest(
        prompt=PROMPT,
        steps=args.steps,
        width=args.size,
        height=args.size,
        batch_size=batch,
        cfg_scale=7.5,
        seed=1,
    )

    def run() -> None:
        result = renderer.txt2img(request, options=DEFAULT_OPTIONS, model="sd15-random")
        assert len(result.images) == batch

    return run


def runtime_renderer(pipe: Any, device: str, dtype: Any, *, channels_last: bool, compile: bool):
    """The pipeline as the model store puts it on the device, behind the pod's Renderer."""
    import torch

    from runtime.model_store import clone_pipeline
    from runtime.render import Renderer
    from runtime.settings import RuntimeSettings

    device_pipe = clone_pipeline(pipe, device, dtype)
    if channels_last:
        device_pipe.unet.to(memory_format=torch.channels_last)
    settings = RuntimeSettings(
        device="cuda" if device.startswith("cuda") else "cpu",
        channels_last=channels_last,
        compile=compile,
    )
    models = ResidentModels(device_pipe, device, "sd15-random")
    return Renderer(models, settings)  # type: ignore[arg-type]  # renders need only use()


def timed(run: Any, device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    run()
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# --- report -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 64x64, 4 steps, CPU")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    parser.add_argument("--compile", action="store_true", help="runtime tuned: torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for the floor")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.size, args.steps, args.repeats = "tiny", 64, 4, 3
        args.device = args.device or "cpu"
        # One thread: the tiny model gains nothing from two, and the machine is shared.
        args.threads = args.threads or 1
        args.batches = [1, 2]

    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    # The runtime's dtype: SDEKS_DTYPE (float16) on CUDA; the model store runs CPU in float32.
    dtype = torch.float16 if on_cuda else torch.float32
    name = torch.cuda.get_device_name(device) if on_cuda else "CPU"

    pipe = build_pipeline(args.model, device)
    flops = count_flops(pipe, args.size, args.steps)
    if args.peak_tflops:
        peak, peak_note = args.peak_tflops * 1e12, "--peak-tflops"
    elif on_cuda and "H100" in name:
        peak, peak_note = H100_TFLOPS * 1e12, "the issue's H100 figure"
    else:
        peak = measured_peak(device, dtype)
        peak_note = f"a {str(dtype).removeprefix('torch.')} matmul measured now"
    print(f"# machine: {machine()}; device {device} ({name}), torch {torch.__version__}")
    print(
        f"# model {args.model} (random weights), {args.size}x{args.size}, {args.steps} steps, "
        f"CFG; median of {args.repeats} after a warm-up"
    )
    print(
        f"# FLOP per image: {si(flops['issue'])} counted the issue's way (UNet step "
        f"{si(flops['unet_step'])}, VAE decode {si(flops['vae'])}), {si(flops['all'])} with the "
        "attention matmuls"
    )
    print(f"# peak {si(peak)}/s ({peak_note}): floor {flops['issue'] / peak:.4f} s/image")

    paths: list[tuple[str, Any]] = [("plain diffusers (fp32)", None)]
    dtype_name = str(dtype).removeprefix("torch.")
    paths.append((f"runtime ({dtype_name})", dict(channels_last=False, compile=False)))
    tuned = "channels_last" + (" + compile" if args.compile and on_cuda else "")
    paths.append(
        (
            f"runtime tuned ({dtype_name}, {tuned})",
            dict(channels_last=True, compile=args.compile and on_cuda),
        )
    )
    seconds: dict[tuple[str, int], float] = {}
    for label, options in paths:
        if options is None:
            calls = {b: plain_call(pipe, args, b, device) for b in args.batches}
        else:
            if on_cuda:
                torch.backends.cuda.matmul.allow_tf32 = True  # as the pod sets on CUDA
                torch.backends.cudnn.allow_tf32 = True
            renderer = runtime_renderer(pipe, device, dtype, **options)
            calls = {b: runtime_call(renderer, args, b) for b in args.batches}
        for batch, call in calls.items():
            seconds[(label, batch)] = timed(call, device, args.repeats) / batch
            print(f"# {label}, batch {batch}: {seconds[(label, batch)]:.4f} s/image", flush=True)

    rows = []
    for label, _ in paths:
        for batch in args.batches:
            s = seconds[(label, batch)]
            plain = seconds[(paths[0][0], batch)]
            rows.append(
                [
                    label,
                    batch,
                    f"{s:.4f}",
                    f"{1 / s:.2f}",
                    f"{plain / s:.2f}",
                    f"{flops['issue'] / peak / s:.1%}",
                    f"{flops['all'] / peak / s:.1%}",
                ]
            )
    print()
    header = ["path", "batch", "s/image", "images/s", "vs plain", "of floor", "of floor (attn)"]
    print(table(rows, header))
    best = max(args.batches)
    tuned_label = paths[-1][0]
    runtime_s = min(seconds[(p, best)] for p, _ in paths[1:])
    ratio = seconds[(paths[0][0], best)] / runtime_s
    print(
        f"\n# of floor: the floor time ({si(flops['issue'])} per image at {si(peak)}/s) over "
        f"the measured time; the tuned row is {tuned_label}"
    )
    print(
        f"runtime/plain images/s at batch {best}: {ratio:.2f} "
        f"(runtime at {flops['issue'] / peak / runtime_s:.1%} of the FLOP floor, {device})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
