"""Real clients' A1111 bodies against a pod: how many render, how many are refused, none crash.

`benchmarks/corpus/*.json` holds request bodies in the shapes public clients
send to `/sdapi/v1/txt2img`, `/img2img` and `/extra-single-image` (the
webuiapi client, bots, chat front-ends, editor plugins, the EKS sample,
serverless workers, the ControlNet and ADetailer extensions' examples), each
`{"source", "endpoint", "body"}`. This script builds a tiny models bucket
offline holding every model those bodies name (random weights under the real
names: `v1-5-pruned-emaonly.safetensors`, `control_v11p_sd15_canny`,
`face_yolov8n.pt` as its `.pt2` export, `R-ESRGAN 4x+`, LoRAs, embeddings,
a VAE, `styles.csv`), starts a standalone pod app (`runtime.app.create_app`
behind FastAPI's TestClient) and sends each body after scaling its sizes
down (see `scale`): everything else goes as the client sent it.

    python benchmarks/a1111_corpus.py            # every body
    python benchmarks/a1111_corpus.py --quick    # a fixed subset of 8
    python benchmarks/a1111_corpus.py --only 16_hires_resrgan

Outcomes: `rendered` (HTTP 200 with images), `refused <code>: <message>` (an
error answer with the runtime's error code: a field the pod does not support
or a model it lacks), `crash` (HTTP 500 without an error code, or an
exception out of the app). The last line is the summary; the exit status is 1
when any body crashed the pod.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine  # noqa: E402

CORPUS = REPO / "benchmarks" / "corpus"
DEFAULT_MODEL = "v1-5-pruned-emaonly"

#: The --quick subset: one body per main path (plain, ControlNet, ADetailer, hires,
#: LoRA, extras, img2img through the EKS sample's legacy keys, a bot).
QUICK = (
    "01_webuiapi_txt2img_defaults",
    "03_webuiapi_controlnet_unit_new",
    "06_webuiapi_adetailer_old",
    "09_webuiapi_extra_single_image",
    "16_hires_resrgan",
    "30_lora_tags",
    "38_telegram_bot",
    "44_eks_sample_i2i",
)

#: Bucket names of the tiny ControlNets (one tiny SD 1.x ControlNet under each name).
CONTROLNETS = (
    "control_v11p_sd15_canny",
    "control_v11p_sd15_lineart",
    "control_v11f1p_sd15_depth",
    "control_v11p_sd15_openpose",
    "control_v11f1e_sd15_tile",
    "control_v11p_sd15_inpaint",
)
EMBEDDINGS = ("EasyNegative", "bad-hands-5", "ng_deepnegative_v1_75t", "badhandv4")
LORAS = ("add_detail", "more_details")
DETECTORS = ("face_yolov8n", "hand_yolov8n")
STYLES = (
    "name,prompt,negative_prompt\n"
    'Cinematic,"cinematic still of {prompt}, shallow depth of field","cartoon, painting"\n'
    'Photographic,"photograph, 50mm, sharp focus","lowres"\n'
)

# --- the models bucket ------------------------------------------------------


def _lora(pipe: Any, dest: Path) -> None:
    """A rank-4 LoRA of the tiny UNet's attention, in diffusers' file layout."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    out = dest.parent / "lora-tmp"
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    (out / "pytorch_lora_weights.safetensors").rename(dest)
    shutil.rmtree(out)


def _annotators(root: Path) -> None:
    """Random weights, at the published architectures' sizes and in their files' key
    layouts, for the model-based preprocessors the corpus names (lineart_realistic,
    openpose_full, depth_midas: about 700 MB, so only the full run builds them)."""
    import torch
    from controlnet_aux.lineart import Generator
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.open_pose.body import bodypose_model
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.hand import handpose_model

    folder = root / "ControlNet" / "annotators"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")
    # The published OpenPose files name tensors without the block prefix (`conv1_1.weight`
    # for the module's `model0.conv1_1.weight`); controlnet_aux maps them back.
    for model, name in (
        (bodypose_model(), "body_pose_model"),
        (handpose_model(), "hand_pose_model"),
    ):
        state = {k.split(".", 1)[1]: v for k, v in model.state_dict().items()}
        torch.save(state, folder / f"{name}.pth")
    torch.save(FaceNet().state_dict(), folder / "facenet.pth")
    depth = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    torch.save(depth.state_dict(), folder / "dpt_hybrid-midas-501f0c75.pt")


def build_bucket(root: Path, *, quick: bool) -> Path:
    """The tiny models bucket under `root`, with the names the corpus uses."""
    from safetensors.torch import save_file

    from runtime.detectors import save_tiny_detector
    from runtime.model_ldm import vae_to_ldm
    from runtime.tiny import build_tiny_pipeline, make_tiny
    from runtime.tiny_controlnet import make_tiny_controlnet
    from runtime.tiny_embeddings import make_tiny_embedding
    from runtime.tiny_kinds import make_tiny_face_models, make_tiny_upscalers, write_state_dict

    ckpt = root / "Stable-diffusion"
    make_tiny(ckpt / DEFAULT_MODEL, family="sd15", single_file=True)
    if not quick:
        make_tiny(ckpt / "sd_xl_base_1.0", family="sdxl", single_file=True)
        # A tiny SDXL of other weights under the refiner's name: the runtime refuses
        # the real refiner's architecture (docs/runtime.md), so this only checks the
        # body's refiner fields and naming.
        make_tiny(ckpt / "sd_xl_refiner_1.0", family="sdxl", single_file=True, seed=1)
        _annotators(root)

    pipe = build_tiny_pipeline("sd15", seed=0)  # the weights of `sd15`
    (root / "VAE").mkdir()
    vae = pipe.vae.state_dict()
    save_file(
        vae_to_ldm(vae, dict(pipe.vae.config)),
        str(root / "VAE" / "vae-ft-mse-840000-ema-pruned.safetensors"),
    )
    (root / "Lora").mkdir()
    _lora(pipe, root / "Lora" / f"{LORAS[0]}.safetensors")
    for name in LORAS[1:]:
        shutil.copy2(
            root / "Lora" / f"{LORAS[0]}.safetensors", root / "Lora" / f"{name}.safetensors"
        )
    for seed, name in enumerate(EMBEDDINGS):
        make_tiny_embedding(root / "embeddings" / name, family="sd15", seed=seed)

    first = make_tiny_controlnet(root / "ControlNet" / CONTROLNETS[0], single_file=True)
    for name in CONTROLNETS[1:]:
        shutil.copy2(first, first.with_name(f"{name}.safetensors"))
        shutil.copytree(first.with_name(first.stem + ".config"), first.with_name(f"{name}.config"))
    for name in DETECTORS:
        save_tiny_detector(root / "adetailer" / f"{name}.pt2")

    make_tiny_upscalers(root)
    from runtime.tiny_kinds import _rrdb

    write_state_dict(_rrdb(7), root / "ESRGAN" / "ESRGAN_4x.pth")
    make_tiny_face_models(root)
    (root / "styles.csv").write_text(STYLES)
    return root


# --- the bodies ---------------------------------------------------------------


def picture() -> str:
    """64x64: grey, a white square (edges for canny) and a red one (the tiny detector's 'face')."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (90, 110, 100))
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 4, 28, 28), fill=(255, 255, 255))
    draw.rectangle((36, 36, 55, 55), fill=(255, 0, 0))
    return _b64(image)


def mask() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=255)
    return _b64(image)


def _b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def materialize(value: Any, images: dict[str, str]) -> Any:
    """`"<image>"` and `"<mask>"` anywhere in the body -> tiny base64 PNGs (what the
    dispatcher does for a client's image links)."""
    if isinstance(value, str):
        return images.get(value, value)
    if isinstance(value, list):
        return [materialize(v, images) for v in value]
    if isinstance(value, dict):
        return {k: materialize(v, images) for k, v in value.items()}
    return value


SIZE = 64
MAX_STEPS = 2
MAX_BATCH = 2
MAX_HR_SIDE = 128


def _scaled(value: Any, factor: float, cap: int) -> Any:
    """A size field scaled by `factor`, to a multiple of 8 in 8..cap; 0/absent/odd values as sent."""
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return value
    return int(min(cap, max(8, round(value * factor / 8) * 8)))


def scale(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """Sizes down for a CPU: width/height -> 64 (other sizes by the same factor: hires
    resize ≤ 128, SD upscale overlap, ADetailer inpaint size, extras resize-to ≤ 128),
    steps ≤ 2, batch_size and n_iter ≤ 2. Everything else as the client sent it."""
    out = json.loads(json.dumps(body))
    width = out.get("width")
    factor = SIZE / width if isinstance(width, int) and width > 0 else SIZE / 512
    for key in ("width", "height"):
        if key in out:
            out[key] = SIZE
    for key in ("steps", "hr_second_pass_steps"):
        if isinstance(out.get(key), int) and not isinstance(out[key], bool):
            out[key] = min(out[key], MAX_STEPS)
    for key in ("batch_size", "n_iter"):
        if isinstance(out.get(key), int) and not isinstance(out[key], bool):
            out[key] = min(out[key], MAX_BATCH)
    for key in ("hr_resize_x", "hr_resize_y"):
        if key in out:
            out[key] = _scaled(out[key], factor, MAX_HR_SIDE)
    if endpoint == "extra-single-image":
        for key in ("upscaling_resize_w", "upscaling_resize_h"):
            if key in out:
                out[key] = _scaled(out[key], SIZE / 512, MAX_HR_SIDE)
    script = str(out.get("script_name") or "").lower()
    args = out.get("script_args")
    if script == "sd upscale" and isinstance(args, list) and len(args) > 1:
        args[1] = _scaled(args[1], factor, SIZE // 2)
    for name, script_body in (out.get("alwayson_scripts") or {}).items():
        if name.lower() == "sampler" and isinstance(script_body, dict):
            # A1111's Sampler script carries the steps too: [steps, sampler, scheduler].
            sampler_args = script_body.get("args")
            if isinstance(sampler_args, list) and sampler_args and isinstance(sampler_args[0], int):
                sampler_args[0] = min(sampler_args[0], MAX_STEPS)
        if name.lower() == "adetailer" and isinstance(script_body, dict):
            for unit in script_body.get("args") or []:
                if isinstance(unit, dict):
                    for key in ("ad_inpaint_width", "ad_inpaint_height"):
                        if key in unit:
                            unit[key] = SIZE
                    if isinstance(unit.get("ad_steps"), int):
                        unit["ad_steps"] = min(unit["ad_steps"], MAX_STEPS)
    return out


def features(endpoint: str, body: dict[str, Any]) -> str:
    """The A1111 features a body uses, as short tags."""
    tags: list[str] = []
    if body.get("mask"):
        tags.append("inpaint")
    if body.get("enable_hr"):
        tags.append(f"hires:{body.get('hr_upscaler') or 'Latent'}")
    for key in ("restore_faces", "tiling"):
        if body.get(key):
            tags.append(key)
    if body.get("styles"):
        tags.append("styles")
    if body.get("refiner_checkpoint"):
        tags.append("refiner")
    if body.get("subseed_strength"):
        tags.append("variation")
    if body.get("script_name"):
        tags.append(f"script:{body['script_name']}")
    prompts = f"{body.get('prompt', '')} {body.get('negative_prompt', '')}"
    if "<lora:" in prompts:
        tags.append("lora")
    if any(name in prompts for name in EMBEDDINGS):
        tags.append("embeddings")
    overrides = body.get("override_settings") or {}
    if overrides:
        tags.append("override:" + "+".join(sorted(overrides)))
    for name, script in (body.get("alwayson_scripts") or {}).items():
        if not isinstance(script, dict):
            if "legacy-keys" not in tags:
                tags.append("legacy-keys")
            continue
        units = [u for u in script.get("args") or [] if isinstance(u, dict)]
        if name.lower() == "controlnet":
            modules = "+".join(str(u.get("module", "none")) for u in units)
            tags.append(f"controlnet:{modules}" if units else "controlnet:empty")
        elif name.lower() == "adetailer":
            tags.append(f"adetailer:{len(units)}")
        else:
            tags.append(f"script:{name}")
    if endpoint == "extra-single-image":
        tags.append(f"extras:{body.get('upscaler_1')}")
        if body.get("upscaler_2") not in (None, "None"):
            tags.append(f"+{body.get('upscaler_2')}")
    return ",".join(tags).replace(" ", "_") or "-"


def _one_line(text: str, limit: int = 100) -> str:
    return " ".join(str(text).split())[:limit]


def outcome(status: int, answer: Any) -> tuple[str, int]:
    """(outcome text, images returned) of one answer."""
    if status == 200:
        images = answer.get("images") if isinstance(answer, dict) else None
        if images is None and isinstance(answer, dict) and answer.get("image"):
            images = [answer["image"]]
        return "rendered", len(images or [])
    if isinstance(answer, dict) and isinstance(answer.get("error"), str) and status != 500:
        return f"refused {answer['error']}: {_one_line(answer.get('detail', ''))}", 0
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        # 500 with a code: a model that did not load (the runtime's model_load_failed).
        return f"refused {answer['error']}: {_one_line(answer.get('detail', ''))}", 0
    if status == 422 and isinstance(answer, dict) and isinstance(answer.get("detail"), list):
        first = answer["detail"][0] if answer["detail"] else {}
        where = ".".join(str(p) for p in first.get("loc", [])[1:])
        message = _one_line(f"{where}: {first.get('msg', '')}")
        return f"refused request_validation: {message}", 0
    return f"crash HTTP {status}: {_one_line(json.dumps(answer))}", 0


ROUTES = {
    "txt2img": "/sdapi/v1/txt2img",
    "img2img": "/sdapi/v1/img2img",
    "extra-single-image": "/sdapi/v1/extra-single-image",
}


def load_corpus(only: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    entries = []
    for path in sorted(CORPUS.glob("*.json")):
        if only is None or path.stem in only:
            entries.append((path.stem, json.loads(path.read_text())))
    if only is not None:
        missing = sorted(set(only) - {name for name, _ in entries})
        if missing:
            raise SystemExit(f"no corpus file named {', '.join(missing)}")
    return entries


def run(entries: list[tuple[str, dict[str, Any]]], *, quick: bool) -> int:
    from fastapi.testclient import TestClient

    from runtime.app import create_app
    from runtime.model_source import LocalSource
    from runtime.model_store import ModelStore
    from runtime.settings import RuntimeSettings

    print(f"# {machine()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdeks-corpus-") as tmp:
        root = build_bucket(Path(tmp) / "models", quick=quick)
        cache = Path(tmp) / "cache"
        built = time.perf_counter() - started
        print(f"# tiny models bucket built in {built:.1f} s; {len(entries)} bodies")
        settings = RuntimeSettings(
            default_model=DEFAULT_MODEL, models=str(root), cache_dir=cache, device="cpu"
        )
        store = ModelStore(LocalSource(root), cache_dir=cache)
        images = {"<image>": picture(), "<mask>": mask()}
        rows = []
        counts = {"rendered": 0, "refused": 0, "crash": 0}
        t0 = time.perf_counter()
        with TestClient(
            create_app(settings, models=store), raise_server_exceptions=False
        ) as client:
            for name, entry in entries:
                endpoint = entry["endpoint"]
                body = materialize(scale(endpoint, entry["body"]), images)
                begin = time.perf_counter()
                try:
                    response = client.post(ROUTES[endpoint], json=body)
                    try:
                        answer = response.json()
                    except ValueError:
                        answer = response.text
                    text, n_images = outcome(response.status_code, answer)
                except Exception as exc:  # an exception out of the app is a crash
                    text, n_images = f"crash {type(exc).__name__}: {_one_line(exc)}", 0
                ms = (time.perf_counter() - begin) * 1000
                counts[text.split(" ", 1)[0]] += 1
                rows.append(
                    [
                        name,
                        entry["source"],
                        features(endpoint, entry["body"]),
                        n_images,
                        f"{ms:.0f}",
                        text,
                    ]
                )
        elapsed = time.perf_counter() - t0
    header = ["file", "source", "features", "images", "ms", "outcome"]
    print(_left_table(rows, header))
    total = len(entries)
    pct = 100 * counts["rendered"] / total if total else 0.0
    print(
        f"rendered {counts['rendered']} of {total} ({pct:.0f}%), refused {counts['refused']}, "
        f"crashed {counts['crash']} in {elapsed:.1f} s"
    )
    return 1 if counts["crash"] else 0


def _left_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[re.sub(r"\s{2,}", " ", str(c)) for c in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the {len(QUICK)} bodies of QUICK")
    parser.add_argument("--only", nargs="+", metavar="FILE", help="corpus files by stem")
    args = parser.parse_args(argv)
    # Before torch is imported (here, not at import: tests import QUICK from this module).
    # The tiny models are too small for intra-op threads to pay on a shared CPU.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    only = list(QUICK) if args.quick else args.only
    import torch

    torch.set_num_threads(1)
    import logging

    import diffusers

    logging.basicConfig(level=logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    return run(
        load_corpus(only), quick=args.quick or bool(args.only and not _needs_full(args.only))
    )


def _needs_full(names: list[str]) -> bool:
    """Whether these bodies need the SDXL checkpoints or the annotators (slow to build)."""
    return any("sdxl" in n or "controlnet" in n for n in names)


if __name__ == "__main__":
    sys.exit(main())
