"""Model switching: activation time per tier through the real ModelStore, against raw ceilings.

The checkpoint is synthetic: the tiny SD 1.x model of `runtime.tiny` with its
UNet widened (block_out_channels w, 2w; random weights, float32) until the
whole model weighs `--size-mib` (default 512 MiB); nearly all of it is the
UNet, as in a real checkpoint. It is a diffusers folder (`--layout folder`,
the default) or one `.safetensors` file in the original LDM layout with its
config folder beside it (`--layout file`), uploaded to the models bucket of a
moto server process.

Activation = `ModelStore.acquire(name)` returning a pinned pipeline on the
device, with the model found in:

    gpu    already on the device (on CPU: in RAM, which is the device)
    ram    in host RAM, not on the device (prefetched): the host -> device copy.
           On CPU the store's RAM pipelines are its device pipelines, so this
           row runs the store with device copies on (they share the RAM
           tensors): bookkeeping only, no ceiling.
    disk   in the local disk cache (a fresh store on the same cache folder)
    s3     only in the bucket (a fresh store on an empty cache folder), one GET
           per object (`SDEKS_S3_PART_MIB=0`, what the local stack sets on moto)
    s3-ranged
           the same with the default download pattern for S3: 16 MiB ranges,
           8 at a time

Ceilings, measured in the same run on the same files and client:

    gpu    building the pipeline object over the resident modules (`build_like`)
    ram    torch `.to(device)` of every weight, already in the store's dtype
    disk   `safetensors.torch.load_file` of the model's weight files (page
           cache warm, as for the store). On CPU that maps the files and reads
           nothing, exactly as the store's diffusers load does (its "RAM" model
           is paged in from the disk cache's file by the first render; the
           `+ read the bytes` line shows that cost). On a GPU: the bytes read
           into memory, + the ram ceiling.
    s3     one plain GetObject per file of the model (weights, configs,
           tokenizer) with the same boto3 client, read into memory, + the disk
           ceiling
    s3-ranged
           the same GETs as the store's ranged pattern done bare (HEAD, then
           16 MiB ranges 8 at a time) into memory, + the disk ceiling. moto
           serves a ranged GET by reading the whole object and slicing it, so
           on moto this pattern costs about one whole-object read per range:
           the reason the local stack downloads with one GET per object.

Both s3 rows include what the store adds on the way: writing the file,
hashing it (overlapped with the download), the metadata, the load.

Each figure is the median of `--repeats` runs.

    python benchmarks/model_switch.py                  # 512 MiB, 3 repeats, ~1 min on CPU
    python benchmarks/model_switch.py --quick          # 16 MiB, 1 repeat, ~10 s
    python benchmarks/model_switch.py --device cuda    # on a GPU machine

The last line is the headline: `worst tier/ceiling: X.XX (<tier>, <size>)`.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import MotoServer, machine, table, workdir

# diffusers' loading bars and transformers' notes about optional backends are noise here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

MiB = 2**20
MODEL = "switch-bench"
TIERS = ("gpu", "ram", "disk", "s3", "s3-ranged")


# --- the synthetic checkpoint ------------------------------------------------------


def _unet_bytes(config: dict[str, Any], width: int) -> int:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            {**config, "block_out_channels": (width, 2 * width)}
        )
    return sum(p.numel() * 4 for p in unet.parameters())


def build_checkpoint(size_bytes: int, seed: int = 0) -> tuple[Any, int]:
    """The tiny pipeline with its UNet widened to make the model about `size_bytes`; (pipe, width)."""
    import torch
    from diffusers import UNet2DConditionModel

    from runtime.model_store import module_bytes
    from runtime.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15", seed=seed)
    config = dict(pipe.unet.config)
    rest = module_bytes(pipe) - _unet_bytes(config, config["block_out_channels"][0])
    # Widths in steps of 16 keep the group norms (16 groups) and attention heads (8) whole.
    width = 32
    while _unet_bytes(config, width + 16) + rest <= size_bytes:
        width += 16
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**config, "block_out_channels": (width, 2 * width)})
    pipe.register_modules(unet=unet.eval().requires_grad_(False))
    return pipe, width


def write_checkpoint(pipe: Any, dest: Path, layout: str) -> list[Path]:
    """Write `pipe` in the bucket layout under `dest` (the models root); every file of it."""
    from transformers.utils import logging as hf_logging

    checkpoints = dest / "Stable-diffusion"
    checkpoints.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    if layout == "folder":
        folder = checkpoints / MODEL
        pipe.save_pretrained(str(folder), safe_serialization=True)
        return sorted(p for p in folder.rglob("*") if p.is_file())
    from safetensors.torch import save_file

    from runtime.model_ldm import pipeline_to_ldm
    from runtime.tiny import single_file_config_dir

    path = checkpoints / f"{MODEL}.safetensors"
    config = single_file_config_dir(path)
    pipe.save_pretrained(str(config), safe_serialization=True)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()  # the config folder carries no weights
    save_file(pipeline_to_ldm(pipe), str(path))
    return [path, *sorted(p for p in config.rglob("*") if p.is_file())]


def upload(s3: Any, root: Path, bucket: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, path.relative_to(root).as_posix())


def model_name(layout: str) -> str:
    return MODEL if layout == "folder" else f"{MODEL}.safetensors"


# --- through the store ------------------------------------------------------------


def new_store(
    s3: Any,
    bucket: str,
    cache: Path,
    device: str,
    *,
    device_copies: bool | None = None,
    part_bytes: int = 0,
):
    from runtime.model_source import open_source
    from runtime.model_store import ModelStore, StoreLimits

    limits = StoreLimits(gpu_bytes=64 * 2**30) if device_copies and device == "cpu" else None
    store = ModelStore(
        open_source(f"s3://{bucket}", s3_client=s3, part_bytes=part_bytes),
        cache_dir=cache,
        limits=limits,
        device=device,
        device_copies=device_copies,
    )
    store.refresh()  # the listing is not part of a switch
    return store


def timed_acquire(store: Any, name: str, device: str) -> tuple[float, Any]:
    started = time.perf_counter()
    lease = store.acquire(name)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    lease.release()
    return elapsed, lease.timings


def close(store: Any) -> None:
    store.close()
    gc.collect()
    if _cuda_available():
        import torch

        torch.cuda.empty_cache()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def measure_store(
    s3: Any, bucket: str, work: Path, name: str, device: str, *, ranged: bool = True
) -> dict[str, Any]:
    """One activation per tier; seconds and the store's own breakdown."""
    from runtime.model_source import DEFAULT_PART_BYTES

    out: dict[str, Any] = {}
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    if ranged:
        # s3-ranged: nothing on this machine yet, the download pattern for S3.
        store = new_store(s3, bucket, cache, device, part_bytes=DEFAULT_PART_BYTES)
        out["s3-ranged"] = timed_acquire(store, name, device)
        close(store)
        shutil.rmtree(cache)
    # s3: the same with one GET per object. Then gpu: the same store asked again.
    store = new_store(s3, bucket, cache, device)
    out["s3"] = timed_acquire(store, name, device)
    out["gpu"] = timed_acquire(store, name, device)
    close(store)
    # disk: a fresh store (a pod restart) finds the disk cache.
    store = new_store(s3, bucket, cache, device)
    out["disk"] = timed_acquire(store, name, device)
    close(store)
    # ram: prefetched into RAM, then made active (device copies on, also on CPU).
    store = new_store(s3, bucket, cache, device, device_copies=True)
    store.prefetch(name).result()
    out["ram"] = timed_acquire(store, name, device)
    close(store)
    for tier, (_, timings) in out.items():
        expected = "source" if tier.startswith("s3") else tier
        if timings.found_in != expected:
            raise RuntimeError(f"{tier} activation found the model in {timings.found_in}")
    return out


# --- ceilings -----------------------------------------------------------------------


def ranged_get(s3: Any, bucket: str, key: str) -> int:
    """The object into memory the way `S3Source.download` asks for it: HEAD, then
    `DEFAULT_PART_BYTES` ranges, `DEFAULT_CONCURRENCY` at a time (no disk, no hash)."""
    from concurrent.futures import ThreadPoolExecutor

    from runtime.model_source import DEFAULT_CONCURRENCY, DEFAULT_PART_BYTES

    head = s3.head_object(Bucket=bucket, Key=key)
    size, etag = int(head["ContentLength"]), head["ETag"]
    ranges = [
        (a, min(a + DEFAULT_PART_BYTES, size) - 1) for a in range(0, size, DEFAULT_PART_BYTES)
    ]

    def fetch(rng: tuple[int, int]) -> int:
        body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={rng[0]}-{rng[1]}", IfMatch=etag)
        return len(body["Body"].read())

    if not ranges:
        return 0
    with ThreadPoolExecutor(min(DEFAULT_CONCURRENCY, len(ranges))) as pool:
        return sum(pool.map(fetch, ranges))


def measure_ceilings(
    s3: Any,
    bucket: str,
    keys: list[str],
    files: list[Path],
    device: str,
    dtype: Any,
    *,
    ranged: bool = True,
) -> dict[str, float]:
    """Raw steps, seconds. `keys`: every object of the model; `files`: its weight files on disk."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    from runtime.families import build_like
    from runtime.tiny import build_tiny_pipeline

    c: dict[str, float] = {}
    started = time.perf_counter()
    for key in keys:
        s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    c["get"] = time.perf_counter() - started

    if ranged:
        started = time.perf_counter()
        for key in keys:
            ranged_get(s3, bucket, key)
        c["ranged"] = time.perf_counter() - started

    started = time.perf_counter()
    for f in files:
        digest = hashlib.sha256()
        with f.open("rb") as fh:
            while chunk := fh.read(8 * MiB):
                digest.update(chunk)
    c["sha256"] = time.perf_counter() - started

    started = time.perf_counter()
    states = [load_file(str(f)) for f in files]
    c["mmap"] = time.perf_counter() - started
    del states
    # load_file maps the file; a loaded model has its bytes in memory: read them too.
    started = time.perf_counter()
    states = [{k: v.clone() for k, v in load_file(str(f)).items()} for f in files]
    c["load"] = time.perf_counter() - started

    if device.startswith("cuda"):
        host = [{k: v.to(dtype) for k, v in s.items()} for s in states]
        torch.cuda.synchronize()
        started = time.perf_counter()
        moved = [{k: v.to(device) for k, v in s.items()} for s in host]
        torch.cuda.synchronize()
        c["h2d"] = time.perf_counter() - started
        del host, moved
    del states

    pipe = build_tiny_pipeline("sd15")
    started = time.perf_counter()
    build_like(type(pipe), pipe)
    c["build"] = time.perf_counter() - started
    return c


def tier_ceiling(tier: str, c: dict[str, float], on_cuda: bool) -> float | None:
    """A tier's ceiling from the raw steps. The store reads the weights into memory
    (no mmap: the RAM tier holds real bytes), so a disk activation's ceiling is
    `load_file` plus reading the bytes; on a GPU, plus the host-to-device copy."""
    h2d = c.get("h2d", 0.0)
    load = c["load"]
    if tier == "gpu":
        return c["build"]
    if tier == "ram":
        return h2d if on_cuda else None
    if tier == "disk":
        return load + h2d
    return c["ranged" if tier == "s3-ranged" else "get"] + load + h2d


# --- report -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB, 1 repeat (the tests)")
    parser.add_argument("--size-mib", type=int, default=512, help="checkpoint size")
    parser.add_argument("--layout", choices=["folder", "file"], default="folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--no-ranged",
        action="store_true",
        help="skip the s3-ranged row (on moto each range reads the whole object: slow when large)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.repeats = 16, 1

    import torch
    from diffusers.utils import logging as diffusers_logging

    from runtime.model_store import module_bytes

    diffusers_logging.disable_progress_bar()
    on_cuda = args.device.startswith("cuda")
    dtype = torch.float16 if on_cuda else torch.float32
    name = model_name(args.layout)
    print(f"# machine: {machine()}; device {args.device}")
    with workdir() as work:
        pipe, width = build_checkpoint(args.size_mib * MiB)
        nbytes = module_bytes(pipe)
        files = write_checkpoint(pipe, work / "models", args.layout)
        del pipe
        weights = [f for f in files if f.suffix == ".safetensors"]
        file_bytes = sum(f.stat().st_size for f in files)
        weight_bytes = sum(f.stat().st_size for f in weights)
        print(
            f"# checkpoint: tiny SD 1.x, UNet widths ({width}, {2 * width}), {nbytes / MiB:.0f} MiB "
            f"of float32 weights, {args.layout} layout ({len(files)} files, {len(weights)} of "
            f"weights, {file_bytes / MiB:.0f} MiB); store dtype {str(dtype).removeprefix('torch.')}; "
            f"median of {args.repeats}"
        )
        with MotoServer(work) as moto:
            s3 = moto.client("s3")
            bucket = "bench-models"
            s3.create_bucket(Bucket=bucket)
            upload(s3, work / "models", bucket)
            keys = [f.relative_to(work / "models").as_posix() for f in files]
            ranged = not args.no_ranged
            runs = [
                measure_store(s3, bucket, work, name, args.device, ranged=ranged)
                for _ in range(args.repeats)
            ]
            cached = sorted((work / "cache").rglob("*.safetensors"))
            ceiling_runs = [
                measure_ceilings(s3, bucket, keys, cached, args.device, dtype, ranged=ranged)
                for _ in range(args.repeats)
            ]
    ceilings = {k: statistics.median(c[k] for c in ceiling_runs) for k in ceiling_runs[0]}

    rows = []
    ratios: dict[str, float] = {}
    for tier in [t for t in TIERS if t in runs[0]]:
        seconds = statistics.median(r[tier][0] for r in runs)
        timings = runs[len(runs) // 2][tier][1]
        ceiling = tier_ceiling(tier, ceilings, on_cuda)
        ratio = seconds / ceiling if ceiling else None
        if ratio is not None:
            ratios[tier] = ratio
        rows.append(
            [
                tier,
                f"{seconds * 1000:.1f}",
                f"{ceiling * 1000:.1f}" if ceiling else "-",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{nbytes / MiB / seconds:.0f}" if tier != "gpu" and tier != "ram" else "-",
                f"{timings.download_ms:.0f}",
                f"{timings.ram_ms:.0f}",
                f"{timings.device_ms:.0f}",
            ]
        )
    print(
        "\n# activation (ms): the store's acquire() vs the tier's ceiling (the same GETs done "
        "bare for the s3 rows); the store's breakdown"
    )
    header = ["tier", "store", "ceiling", "ratio", "MiB/s", "download"]
    header += ["disk->ram", "ram->device"]
    print(table(rows, header))

    def step(label: str, key: str, mib: float | None) -> list[str]:
        ms = ceilings[key] * 1000
        return [label, f"{ms:.1f}", f"{mib / ceilings[key]:.0f}" if mib else "-"]

    raw = [
        step("GetObject, one per file (same client)", "get", file_bytes / MiB),
        *(
            [step("HEAD + ranged GETs as S3Source (16 MiB x 8)", "ranged", file_bytes / MiB)]
            if "ranged" in ceilings
            else []
        ),
        step("sha256 of the weight files (not in a ceiling)", "sha256", weight_bytes / MiB),
        step("safetensors load_file (mmap, not read)", "mmap", None),
        step("safetensors load_file + read the bytes", "load", weight_bytes / MiB),
        step("pipeline over resident modules (build_like)", "build", None),
    ]
    if "h2d" in ceilings:
        raw.append(step("host -> device copy", "h2d", nbytes / MiB))
    print("\n# raw steps (ms)")
    print(table(raw, ["step", "ms", "MiB/s"]))
    if not on_cuda:
        print("# CPU: the ram row's device copies share the RAM tensors (no copy to compare with)")
    worst = max(ratios, key=lambda t: ratios[t])
    print(
        "\n"
        + ", ".join(f"{t} {r:.2f}" for t, r in ratios.items())
        + " (store/ceiling per tier; target <= 1.3)"
    )
    print(f"worst tier/ceiling: {ratios[worst]:.2f} ({worst}, {nbytes / MiB:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
