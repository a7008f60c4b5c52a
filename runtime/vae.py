"""`sd_vae`: load a VAE file from the models bucket's `VAE/` onto a checkpoint's VAE shape.

A1111 VAE files are usually the original LDM layout (`encoder.down.0...`,
maybe under `first_stage_model.`); some are diffusers state dicts
(`encoder.down_blocks.0...`). Both load offline: the architecture comes from
the checkpoint's own VAE config, the weights from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdeks.errors import ModelLoadError


def read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def is_diffusers_layout(state: dict[str, Any]) -> bool:
    return any(".down_blocks." in k or k.startswith("down_blocks.") for k in state)


def load_vae(path: Path, like: Any, device: str) -> Any:
    """An `AutoencoderKL` shaped like `like` (the checkpoint's VAE) with `path`'s weights."""
    from diffusers import AutoencoderKL

    try:
        state = read_state_dict(path)
        vae = AutoencoderKL.from_config(like.config)
        if not is_diffusers_layout(state):
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            state = convert_ldm_vae_checkpoint(state, vae.config)
        vae.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"VAE {path.name!r} could not be loaded: {exc}"[:500]) from exc
    return vae.to(device=device, dtype=like.dtype).eval()
