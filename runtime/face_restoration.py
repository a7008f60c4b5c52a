"""Face restoration (A1111 `restore_faces`, extras' GFPGAN and CodeFormer).

    detect faces (RetinaFace, `runtime.face_detection`) -> per face: align its five
    landmarks to the FFHQ template, crop at the restorer's size -> restore (GFPGAN,
    or CodeFormer with its fidelity `weight`) -> paste back through the inverse
    transform with a feathered mask that stays inside the face's crop

Pixels outside every detected face's crop are never changed; an image with no
face comes back as it was. Restorer weights live in the models bucket in
A1111's folders, `GFPGAN/` (`GFPGANv1.4.pth`, ...) and `Codeformer/`
(`codeformer-v0.1.0.pth`, ...), and are loaded with spandrel (CodeFormer's
architecture is in the `spandrel-extra-arches` package; see docs/models.md
for its licence). GFPGAN and CodeFormer files whose sizes differ from the
published 512 px models (the tiny test ones) are built with the same
architecture classes from hyperparameters read off the tensor shapes
(CodeFormer's in `runtime.codeformer_arch`). Restorers and the
detector are `ModelKind`s of the model store: loaded once, LRU, accounted.

Errors: an unknown restorer name, or a bucket without that restorer's file or
without a face detector, is `model_not_found` naming the field and listing
what exists.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from runtime import codeformer_arch
from runtime import face_detection as fd
from runtime.model_catalog import ModelEntry
from runtime.model_store import ModelKind
from sdeks.errors import InvalidParameterError, ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

#: The restorers A1111 offers (`face_restoration_model`), with their bucket folder.
RESTORERS = {"CodeFormer": "Codeformer/", "GFPGAN": "GFPGAN/"}
#: A1111's default `code_former_weight` (0 = most restoration, 1 = most fidelity).
DEFAULT_CODEFORMER_WEIGHT = 0.5
#: facexlib's five-point face template for a 512 px crop (eyes, nose, mouth corners).
_FFHQ_TEMPLATE = (
    (192.98138, 239.94708),
    (318.90277, 240.19360),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)
#: Grey that facexlib fills outside the image when a crop reaches past an edge.
_BORDER = (135, 133, 132)


@dataclass
class Restorer:
    """A face restoration network and how to call it."""

    arch: str
    model: Any
    #: Square crop side the network works at.
    size: int

    def to(self, device: str) -> Restorer:
        self.model.to(device)
        return self

    def __call__(self, faces: Any, weight: float) -> Any:
        """(1, 3, size, size) in [-1, 1] -> the restored face, same range."""
        if self.arch == "CodeFormer":
            # The fidelity weight is `weight=` (A1111 passes it so); the forward takes
            # other keywords silently, so a misspelt one would be ignored, not refused.
            return self.model(faces, weight=weight)[0]
        if self.arch == "GFPGAN":
            # Fixed noise: the same image restores to the same pixels every time.
            return self.model(faces, return_rgb=False, randomize_noise=False)[0]
        return self.model(faces)[0]


@functools.cache
def _install_extra_arches() -> bool:
    """Register spandrel-extra-arches (CodeFormer) once per process; whether it is there.

    Cached: it is asked on every restore request, and a missing package would
    otherwise be searched for on `sys.path` each time."""
    try:
        import spandrel_extra_arches
    except ImportError:
        return False
    spandrel_extra_arches.install(ignore_duplicates=True)
    return True


def _gfpgan_from_shapes(state: dict[str, Any]) -> Any:
    """spandrel's GFPGAN class, sized from the tensors (spandrel assumes the 512 px model)."""
    from spandrel.architectures.GFPGAN import GFPGAN
    from spandrel.util import get_seq_len

    log_size = get_seq_len(state, "toRGB") + 2
    out_size = 2**log_size
    style = state["stylegan_decoder.style_mlp.1.weight"].shape[0]
    narrow = state["final_conv.weight"].shape[0] / 256
    base = {16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    multiplier = 2
    if out_size >= 64:
        multiplier = round(state["conv_body_first.weight"].shape[0] / (base[out_size] * narrow / 2))
    num_mlp = sum(
        1 for k in state if k.startswith("stylegan_decoder.style_mlp.") and k.endswith(".weight")
    )
    model = GFPGAN(
        out_size=out_size,
        num_style_feat=style,
        channel_multiplier=multiplier,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=num_mlp,
        input_is_latent=True,
        different_w=state["final_linear.weight"].shape[0] == (log_size * 2 - 2) * style,
        narrow=narrow,
        sft_half=state["condition_scale.0.2.weight"].shape[0]
        == state["condition_scale.0.0.weight"].shape[0],
    )
    model.load_state_dict(state, strict=True)
    return model


def load_restorer(path: Path, entry: ModelEntry) -> Restorer:
    import spandrel

    _install_extra_arches()
    loader = spandrel.ModelLoader(device="cpu")
    state = loader.load_state_dict_from_file(str(path))
    sized = codeformer_arch.from_state_dict(state)
    if sized is not None:  # a CodeFormer whose VQGAN is not the published one
        sized.eval().requires_grad_(False)
        return Restorer(arch="CodeFormer", model=sized, size=int(sized.resolution))
    try:
        descriptor = loader.load_from_state_dict(state)
        model, arch_id = descriptor.model, descriptor.architecture.id
    except spandrel.UnsupportedModelError as exc:
        hint = (
            ""
            if _install_extra_arches()
            else ' (CodeFormer needs spandrel-extra-arches: pip install "sdeks[restorer-codeformer]")'
        )
        raise ModelLoadError(
            f"face restorer {entry.name}: spandrel does not recognise its architecture{hint}"
        ) from exc
    except RuntimeError:
        if "stylegan_decoder.style_mlp.1.weight" not in state:
            raise
        model, arch_id = _gfpgan_from_shapes(state), "GFPGAN"
    if arch_id == "GFPGAN":
        size = 2**model.log_size
    elif arch_id == "CodeFormer":
        size = int(model.resolution)  # the VQGAN's face size (512 published)
    elif arch_id == "RestoreFormer":
        size = 512
    else:
        raise ModelLoadError(
            f"face restorer {entry.name} is a {arch_id} model, not a face restorer"
        )
    model.eval().requires_grad_(False)
    return Restorer(arch=arch_id, model=model, size=size)


RESTORER = ModelKind(
    "face restorer",
    folders=tuple(RESTORERS.values()),
    load=load_restorer,
    suffixes=(".safetensors", ".pth"),
)


def _is_restorer_file(entry: ModelEntry) -> bool:
    stem = entry.model_name.rsplit("/", 1)[-1].lower()
    # facexlib keeps its detector and face parser beside the restorers.
    return not fd._is_detector_file(entry) and not stem.startswith("parsing_")


def _entries(models: Any, kind: ModelKind) -> list[ModelEntry]:
    if models is None or not hasattr(models, "entries"):
        return []
    return list(models.entries(kind))


def restorer_entry(models: Any, name: str, field_name: str) -> ModelEntry:
    """The weight file of restorer `name` ("CodeFormer", "GFPGAN")."""
    if name not in RESTORERS:
        raise InvalidParameterError(
            f"`{field_name}` {name!r} is not a face restorer; available: {', '.join(RESTORERS)}"
        )
    folder = RESTORERS[name]
    files = [
        e for e in _entries(models, RESTORER) if e.key.startswith(folder) and _is_restorer_file(e)
    ]
    if not files:
        raise ModelNotFoundError(
            f"`{field_name}`: no {name} weights in the models bucket's {folder} "
            f"(face restorers installed: {', '.join(available(models)) or 'none'})"
        )
    # Prefer the newest-looking published name (GFPGANv1.4 over v1.3), else the first.
    named = [e for e in files if name.lower() in e.model_name.lower()]
    return sorted(named or files, key=lambda e: e.model_name.lower())[-1 if named else 0]


def detector_entry(models: Any, field_name: str) -> ModelEntry:
    found = fd.detector_entries(_entries(models, fd.FACE_DETECTOR))
    if not found:
        raise ModelNotFoundError(
            f"`{field_name}` needs a face detector: upload a RetinaFace file "
            f"(detection_Resnet50_Final.pth or detection_mobilenet0.25_Final.pth) to "
            f"{fd.FACE_DETECTOR_FOLDERS[0]} in the models bucket"
        )
    # The larger (more accurate) published backbone first.
    return sorted(found, key=lambda e: "resnet" not in e.model_name.lower())[0]


def available(models: Any) -> list[str]:
    """Restorer names with weights in the bucket (`/sdapi/v1/face-restorers`)."""
    entries = _entries(models, RESTORER)
    return [
        name
        for name, folder in RESTORERS.items()
        if any(e.key.startswith(folder) and _is_restorer_file(e) for e in entries)
    ]


def items(models: Any) -> list[dict[str, Any]]:
    source = getattr(getattr(models, "source", None), "url", "")
    return [
        {"name": name, "cmd_dir": f"{source.rstrip('/')}/{RESTORERS[name].rstrip('/')}"}
        for name in available(models)
    ]


def check_restorer(models: Any, name: Any, field_name: str) -> None:
    """Refuse before any model work: unknown name, missing weights, no detector."""
    if not isinstance(name, str):
        raise InvalidParameterError(f"`{field_name}` must be a restorer name, got {name!r:.80}")
    restorer_entry(models, name, field_name)
    detector_entry(models, field_name)


# --- restoring ------------------------------------------------------------------


def _paste(base: Any, face: Any, matrix: Any, size: int) -> Any:
    """`face` (size x size, float RGB) put back into `base` through the inverse of
    `matrix`, feathered; the mask is eroded before it is blurred, so it never
    reaches past the face's crop."""
    import cv2
    import numpy as np

    height, width = base.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    back = cv2.warpAffine(face, inverse, (width, height), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(
        np.ones((size, size), np.float32), inverse, (width, height), flags=cv2.INTER_NEAREST
    )
    side = math.sqrt(float(mask.sum()))
    edge = max(1, int(side / 20))
    mask = cv2.erode(mask, np.ones((2 * edge + 1, 2 * edge + 1), np.uint8))
    if edge > 1:
        mask = cv2.GaussianBlur(mask, (2 * (edge // 2) + 1,) * 2, 0)
    mask = mask[:, :, None]
    return mask * back + (1 - mask) * base


def restore_faces(
    restorer: Restorer,
    detector: Any,
    image: Image.Image,
    *,
    weight: float = DEFAULT_CODEFORMER_WEIGHT,
    check: Callable[[], None] | None = None,
    max_faces: int = fd.MAX_FACES,
) -> tuple[Image.Image, list[Any]]:
    """`image` with every detected face (the `max_faces` best) restored, and the
    faces with the transforms their crops were taken with."""
    import cv2
    import numpy as np
    import torch

    rgb = image.convert("RGB")
    faces = fd.detect(detector, rgb, max_faces=max_faces)
    if not faces:
        return rgb, []
    param = next(restorer.model.parameters())
    base = np.asarray(rgb, dtype=np.float32)
    size = restorer.size
    template = np.array(_FFHQ_TEMPLATE, np.float32) * (size / 512)
    done: list[Any] = []
    for face in faces:
        if check is not None:
            check()
        matrix, _ = cv2.estimateAffinePartial2D(
            np.array(face.landmarks, np.float32), template, method=cv2.LMEDS
        )
        if matrix is None:  # degenerate landmarks: nothing to align
            continue
        crop = cv2.warpAffine(
            base, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=_BORDER
        )
        tensor = torch.from_numpy(crop / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)
        with torch.inference_mode():
            out = restorer(tensor.to(device=param.device, dtype=param.dtype), weight)
        restored = ((out[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
        base = _paste(base, restored, matrix, size)
        done.append((face, matrix))
    return Image.fromarray(base.round().clip(0, 255).astype(np.uint8), "RGB"), done


def restore(
    models: Any,
    image: Image.Image,
    name: str,
    *,
    weight: float = DEFAULT_CODEFORMER_WEIGHT,
    check: Callable[[], None] | None = None,
    field_name: str = "face_restoration_model",
) -> Image.Image:
    """`image` restored by restorer `name`, with the bucket's detector (both leased)."""
    entry = restorer_entry(models, name, field_name)
    detector = detector_entry(models, field_name)
    with (
        models.use_weights(fd.FACE_DETECTOR, detector) as det,
        models.use_weights(RESTORER, entry) as lease,
    ):
        result, faces = restore_faces(lease.model, det.model, image, weight=weight, check=check)
    log.debug("restored %d faces with %s", len(faces), entry.name)
    return result


# --- `restore_faces` in txt2img / img2img (a post-process stage) ----------------


def _default_restorer(models: Any) -> str:
    """The restorer `restore_faces` uses when `face_restoration_model` is not set.

    A1111's default is CodeFormer, and an A1111 install always has both
    restorers; here a bucket may hold one. Clients that send `restore_faces: true`
    without choosing want faces restored, so the installed one serves: CodeFormer
    when its weights and architecture are there, else the first installed; with
    none, CodeFormer (refused with what to upload). A name set explicitly is used
    as given, or refused.
    """
    installed = available(models)
    if "CodeFormer" in installed and _install_extra_arches():
        return "CodeFormer"
    others = [name for name in installed if name != "CodeFormer"]
    return others[0] if others else "CodeFormer"


def _options_of(plan: Any, models: Any) -> tuple[str, float]:
    """The restorer and CodeFormer weight in force (A1111 options, defaults as A1111)."""
    name = plan.opts.get("face_restoration_model") or _default_restorer(models)
    weight = plan.opts.get("code_former_weight", DEFAULT_CODEFORMER_WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
        raise InvalidParameterError(f"`code_former_weight` must be between 0 and 1, got {weight!r}")
    return name, float(weight)


class FaceRestorationStage:
    """`restore_faces`: every finished image through the `face_restoration_model`."""

    script: str | None = None

    def check(self, plan: Any, models: Any, settings: Any) -> None:
        if self.enabled(plan):
            name, _ = _options_of(plan, models)
            check_restorer(models, name, "face_restoration_model")

    def enabled(self, plan: Any) -> bool:
        return bool(plan.request.restore_faces)

    def run(self, images: list[Image.Image], plan: Any, ctx: Any) -> list[Image.Image]:
        name, weight = _options_of(plan, ctx.models)
        out = [
            restore(ctx.models, image, name, weight=weight, check=ctx.control.check)
            for image in images
        ]
        plan.extra_params["Face restoration"] = name
        if name == "CodeFormer":
            plan.extra_params["CodeFormer weight"] = weight
        return out


FACE_RESTORATION = FaceRestorationStage()
