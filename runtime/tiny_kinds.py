"""Tiny random models of the kinds besides checkpoints, in the bucket's folders.

`sdeks models make-tiny DIR --kinds ...` and the tests write these offline:
real architectures that spandrel (or our face detector) recognises from the
state dict, at toy sizes with seeded random weights, so upscaling and face
restoration run end to end on a laptop CPU in milliseconds.

    RealESRGAN/RealESRGAN_x4plus.safetensors        ESRGAN (RRDB), x4     "R-ESRGAN 4x+"
    RealESRGAN/realesr-general-x4v3.safetensors     Compact (SRVGG), x4   "R-ESRGAN General 4xV3"
    ESRGAN/4x-UltraSharp.pth                        ESRGAN (RRDB), x4, a weights-only pickle
    SwinIR/SwinIR_4x.safetensors                    SwinIR, x4            "SwinIR 4x"

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
