"""Tiny random models of the kinds besides checkpoints, in the bucket's folders.

`sdeks models make-tiny DIR --kinds ...` and the tests write these offline:
real architectures that spandrel (or our face detector) recognises from the
state dict, at toy sizes with seeded random weights, so upscaling and face
restoration run end to end on a laptop CPU in milliseconds.

    RealESRGAN/RealESRGAN_x4plus.safetensors        ESRGAN (RRDB), x4     "R-ESRGAN 4x+"
    RealESRGAN/realesr-general-x4v3.safetensors     Compact (SRVGG), x4   "R-ESRGAN General 4xV3"
    ESRGAN/4x-UltraSharp.pth                        ESRGAN (RRDB), x4, a weights-only pickle
    SwinIR/SwinIR_4x.safetensors                    SwinIR, x4            "SwinIR 4x"

    GFPGAN/GFPGANv1.4.safetensors                   GFPGAN at 64 px (the published one is 512)
    Codeformer/codeformer-v0.1.0.safetensors        CodeFormer at 64 px, when spandrel-extra-arches
                                                    is installed (its licence: docs/models.md)
    facedetection/detection_mobilenet0.25_Final.safetensors   RetinaFace, MobileNet 0.25

The detector's face-class bias is raised so that it finds "faces" in any
image (random weights otherwise find none), which is what a test of the
restoration path needs; `faces=False` writes one that finds none.

The tiny CodeFormer is not one spandrel's loader sizes: that loader reads the
transformer's sizes off the tensors but fixes the VQGAN at the published
512 px, 64-channel, six-level layout (63.5 M parameters, 255 MB, tens of
seconds a face on a CPU). Ours keeps the class and its forward, and what that
forward fixes (a 16 x 16 grid of 256-d codes, 8 attention heads), and shrinks
the rest: 64 px faces, 32 channels over three levels, one residual block a
level, a one-layer 16-d transformer, 16 codes, fuse blocks at 64 and 32 px so
the fidelity weight matters (0.54 M parameters, 2.2 MB). spandrel's detection
recognises it as CodeFormer; `runtime.codeformer_arch` builds it from its
shapes.

Random weights do not upscale well: they only prove that the path works and
that the output is the model's, not a resize.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _rrdb(seed: int) -> Any:
    from spandrel.architectures.ESRGAN import ESRGAN

    _seed(seed)
    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)


def _compact(seed: int) -> Any:
    from spandrel.architectures.Compact import Compact

    _seed(seed)
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)


def _swinir(seed: int) -> Any:
    from spandrel.architectures.SwinIR import SwinIR

    _seed(seed)
    return SwinIR(
        img_size=32,
        embed_dim=12,
        depths=[1],
        num_heads=[2],
        window_size=4,
        mlp_ratio=2,
        upscale=4,
        upsampler="nearest+conv",
        resi_connection="1conv",
    )


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


#: Bucket key -> builder of the module whose state dict is written there.
TINY_UPSCALERS: dict[str, Callable[[int], Any]] = {
    "RealESRGAN/RealESRGAN_x4plus.safetensors": _rrdb,
    "RealESRGAN/realesr-general-x4v3.safetensors": _compact,
    "ESRGAN/4x-UltraSharp.pth": _rrdb,
    "SwinIR/SwinIR_4x.safetensors": _swinir,
}


def write_state_dict(module: Any, dest: Path) -> Path:
    """`module`'s weights to `dest`: safetensors, or a plain tensor-only pickle for `.pth`
    (the format most published upscalers ship, read back with a weights-only loader)."""
    import torch
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    if dest.suffix == ".safetensors":
        save_file(state, str(dest), metadata={"format": "pt", "sdeks": "tiny"})
    else:
        torch.save(state, str(dest))
    return dest


def make_tiny_upscalers(root: Path, *, seed: int = 0) -> list[Path]:
    """Write every tiny upscaler under `root` (a models bucket layout); return the files."""
    written = []
    for i, (key, build) in enumerate(TINY_UPSCALERS.items()):
        written.append(write_state_dict(build(seed * 100 + i), Path(root) / key))
    log.info("wrote %d tiny upscalers under %s", len(written), root)
    return written


def _gfpgan(seed: int) -> Any:
    from spandrel.architectures.GFPGAN import GFPGAN

    _seed(seed)
    return GFPGAN(
        out_size=64,
        num_style_feat=32,
        channel_multiplier=1,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=2,
        input_is_latent=True,
        different_w=True,
        narrow=0.125,
        sft_half=True,
    )


def tiny_face_detector(seed: int = 0, *, faces: bool = True) -> Any:
    """A random RetinaFace (MobileNet 0.25) whose output barely depends on the image:
    with `faces`, every 64 px anchor (stride 16) holds a face whose five landmarks sit
    where the FFHQ template puts them, so each face's crop is its box; without, none."""
    import torch

    from runtime.face_detection import build_retinaface
    from runtime.face_restoration import _FFHQ_TEMPLATE

    _seed(seed)
    model = build_retinaface("mobilenet0.25")
    # Landmark offsets are in units of 0.1 x the anchor size from its centre.
    marks = torch.tensor(
        [[(x / 512 - 0.5) / 0.1, (y / 512 - 0.5) / 0.1] for x, y in _FFHQ_TEMPLATE]
    )
    with torch.no_grad():
        for level, (cls, box, mark) in enumerate(
            zip(model.ClassHead, model.BboxHead, model.LandmarkHead, strict=True)
        ):
            for head in (cls, box, mark):
                head.conv1x1.weight.mul_(0.001)
                head.conv1x1.bias.zero_()
            scores = cls.conv1x1.bias.view(2, 2)  # (anchor, [background, face])
            scores[:, 1] = -20.0
            if faces and level == 1:
                scores[0, 1] = 20.0
            mark.conv1x1.bias.view(2, 10).copy_(marks.reshape(1, 10).expand(2, 10))
    return model


def _codeformer(seed: int) -> Any:
    """CodeFormer at 64 px (see the module docstring for what is fixed and why)."""
    from runtime import codeformer_arch

    _seed(seed)
    return codeformer_arch.build(
        (64, 32, (1, 1, 1), 1, (16,)),
        dim_embd=16,
        n_layers=1,
        codebook_size=16,
        connect_list=["64", "32"],
    )


def codeformer_available() -> bool:
    """Whether the tiny CodeFormer can be built (spandrel-extra-arches is installed)."""
    try:
        import spandrel_extra_arches  # noqa: F401
    except ImportError:
        return False
    return True


TINY_FACE_MODELS: dict[str, Callable[[int], Any]] = {
    "GFPGAN/GFPGANv1.4.safetensors": _gfpgan,
    "Codeformer/codeformer-v0.1.0.safetensors": _codeformer,
    "facedetection/detection_mobilenet0.25_Final.safetensors": tiny_face_detector,
}
CODEFORMER_KEY = "Codeformer/codeformer-v0.1.0.safetensors"


def make_tiny_face_models(
    root: Path, *, seed: int = 0, faces: bool = True, codeformer: bool | None = None
) -> list[Path]:
    """Write the tiny restorers and face detector under `root`; return the files.

    `codeformer`: None writes the tiny CodeFormer when spandrel-extra-arches is
    installed; True insists (ImportError without it); False leaves it out."""
    written = [write_state_dict(_gfpgan(seed), Path(root) / "GFPGAN/GFPGANv1.4.safetensors")]
    if codeformer or (codeformer is None and codeformer_available()):
        written.append(write_state_dict(_codeformer(seed), Path(root) / CODEFORMER_KEY))
    detector = tiny_face_detector(seed, faces=faces)
    written.append(
        write_state_dict(
            detector, Path(root) / "facedetection/detection_mobilenet0.25_Final.safetensors"
        )
    )
    log.info("wrote %d tiny face restorers and a detector under %s", len(written) - 1, root)
    return written
