"""Tiny random textual-inversion embeddings for the tiny checkpoints (`runtime.tiny`).

`sdeks models make-tiny DIR --kind embedding --family sd15|sdxl` writes one in
A1111's formats, sized for the tiny text encoders (SD 1.x: `emb_params`
`[vectors, 32]`; SDXL: `clip_l` `[vectors, 32]` and `clip_g` `[vectors, 64]`),
to upload under `embeddings/`.
"""

from __future__ import annotations

from pathlib import Path

#: Widths of the tiny text encoders (`runtime.tiny`): CLIP-L-like, OpenCLIP-G-like.
TINY_WIDTHS = {"clip_l": 32, "clip_g": 64}


def make_tiny_embedding(
    dest: Path, *, family: str = "sd15", vectors: int = 2, seed: int = 0, pt: bool = False
) -> Path:
    """Write a random embedding to `dest` (`.safetensors`, or A1111's `.pt` with `pt`)."""
    import torch
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def rand(width: int) -> torch.Tensor:
        return torch.randn(vectors, width, generator=generator)

    if family == "sdxl":
        dest = dest.with_suffix(".safetensors")
        save_file({"clip_l": rand(32), "clip_g": rand(64)}, str(dest))
    elif pt:
        dest = dest.with_suffix(".pt")
        data = {"string_to_param": {"*": rand(32)}, "name": dest.stem, "step": 0}
        torch.save(data, str(dest))
    else:
        dest = dest.with_suffix(".safetensors")
        save_file({"emb_params": rand(32)}, str(dest))
    return dest
