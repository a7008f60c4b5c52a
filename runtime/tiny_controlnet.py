"""Tiny random ControlNet models that fit the tiny checkpoints of `runtime.tiny`.

Built offline with diffusers' `ControlNetModel.from_unet` on the tiny UNet of
the family, then every weight re-drawn from a seeded normal: a real ControlNet
starts with zero convolutions (no effect until trained), a test model must act.

Layouts (the `ControlNet/` folder of docs/models.md):

- folder (default): a diffusers folder (`config.json` + weights);
- single file: `<name>.safetensors` in the layout real files use (SD 1.x: the
  original `control_model.*` keys of lllyasviel's models; SDXL: diffusers
  keys, as the SDXL ControlNets ship), with its `config.json` in
  `<name>.config/` beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from runtime.tiny import Family, build_tiny_pipeline

#: Four stages, 8x down: the hint goes from image to latent size, as in real models.
_HINT_CHANNELS = (4, 8, 8, 16)


def build_tiny_controlnet(family: Family = "sd15", *, seed: int = 0) -> Any:
    import torch
    from diffusers import ControlNetModel

    unet = build_tiny_pipeline(family, seed=seed).unet
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_HINT_CHANNELS)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return net.eval().requires_grad_(False)


def controlnet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """diffusers ControlNet keys -> the original `control_model.*` layout (the inverse of
    diffusers' `convert_controlnet_checkpoint`)."""
    from runtime.model_ldm import _UNET_RESNET, _unet_prefix_map

    # The UNet map also names the decoder half, which a ControlNet does not have.
    downs = list(config["down_block_types"])
    shape = {**config, "up_block_types": [t.replace("Down", "Up") for t in reversed(downs)]}
    pairs = [(hf, sd) for hf, sd in _unet_prefix_map(shape) if not hf.startswith("up_blocks.")]
    pairs.append(("controlnet_mid_block.", "middle_block_out.0."))
    pairs.append(("controlnet_cond_embedding.conv_in.", "input_hint_block.0."))
    pairs.append(("controlnet_cond_embedding.conv_out.", "input_hint_block.14."))
    for k in range(2 * (len(config["conditioning_embedding_out_channels"]) - 1)):
        pairs.append((f"controlnet_cond_embedding.blocks.{k}.", f"input_hint_block.{2 * (k + 1)}."))
    for i in range(32):
        pairs.append((f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0."))
    out: dict[str, Any] = {}
    for key, value in state.items():
        for hf, sd in pairs:
            if key.startswith(hf):
                rest = key[len(hf) :]
                if ".resnets." in hf:
                    for hf_name, sd_name in _UNET_RESNET:
                        if rest.startswith(hf_name + "."):
                            rest = sd_name + rest[len(hf_name) :]
                            break
                out["control_model." + sd + rest] = value.contiguous()
                break
        else:
            raise KeyError(f"no LDM name for ControlNet key {key!r}")
    return out


def make_tiny_controlnet(
    dest: Path, *, family: Family = "sd15", single_file: bool = False, seed: int = 0
) -> Path:
    """Write a tiny ControlNet to `dest` (folder) or `dest.safetensors` (+ `.config/`)."""
    from safetensors.torch import save_file

    dest = Path(dest)
    net = build_tiny_controlnet(family, seed=seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not single_file:
        if dest.exists():
            shutil.rmtree(dest)
        net.save_pretrained(str(dest), safe_serialization=True)
        return dest
    if dest.suffix != ".safetensors":
        dest = dest.with_name(dest.name + ".safetensors")
    config = dict(net.config)
    state = {k: v.detach() for k, v in net.state_dict().items()}
    if family != "sdxl":
        state = controlnet_to_ldm(state, config)
    save_file(state, str(dest), metadata={"format": "pt", "sdeks": "tiny"})
    config_dir = dest.with_name(dest.stem + ".config")
    if config_dir.exists():
        shutil.rmtree(config_dir)
    config_dir.mkdir()
    clean = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    clean["_class_name"] = "ControlNetModel"
    (config_dir / "config.json").write_text(json.dumps(clean, indent=1, default=list))
    return dest
