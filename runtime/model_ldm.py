"""Diffusers state dicts -> the original LDM single-file key layout.

A1111 and most model sites ship checkpoints as one `.safetensors` in the
layout of the original CompVis/Stability code (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` or `conditioner.embedders.*`).
diffusers only converts *from* that layout (`from_single_file`), so the tiny
test models need the reverse to exercise the single-file path for real. The
mapping is the inverse of `diffusers.loaders.single_file_utils`
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), generalised
from the fixed SD sizes to any `layers_per_block` / block count, so that
`from_single_file(path, config=<diffusers folder>)` gives back the same
tensors bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _unet_prefix_map(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for one UNet config."""
    per = int(config["layers_per_block"]) + 1  # resnets per down block, plus its downsampler
    n = len(config["down_block_types"])
    pairs: list[tuple[str, str]] = list(_UNET_FIXED.items())
    for i in range(n):
        for j in range(per - 1):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1."))
        if i < n - 1:
            pairs.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op.")
            )
        up_has_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(per):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1."))
        if i < n - 1:
            slot = 2 if up_has_attn else 1
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{slot}.")
            )
    pairs.append(("mid_block.resnets.0.", "middle_block.0."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs.append(("mid_block.resnets.1.", "middle_block.2."))
    return pairs


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    pairs = _unet_prefix_map(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for hf, sd in pairs:
            if key.startswith(hf):
                rest = key[len(hf) :]
                if ".resnets." in hf:
                    for hf_name, sd_name in _UNET_RESNET:
                        if rest.startswith(hf_name + "."):
                            rest = sd_name + rest[len(hf_name) :]
                            break
                out["model.diffusion_model." + sd + rest] = value
                break
        else:
            raise KeyError(f"no LDM name for UNet key {key!r}")
    return out


def _vae_prefix_map(config: dict[str, Any]) -> list[tuple[str, str]]:
    n = len(config["down_block_types"])
    per = int(config["layers_per_block"])
    pairs: list[tuple[str, str]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
        ("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
        ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1."),
    ]
    for part in ("encoder", "decoder"):
        for i in range(2):
            pairs.append((f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}."))
    for i in range(n):
        for j in range(per):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        for j in range(per + 1):
            pairs.append(
                (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.")
            )
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    return pairs


_VAE_ATTN = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    pairs = _vae_prefix_map(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for hf, sd in pairs:
            if key.startswith(hf):
                new = sd + key[len(hf) :]
                break
        if ".mid.attn_1." in new:
            for hf_name, sd_name in _VAE_ATTN:
                new = new.replace(".attn_1." + hf_name, ".attn_1." + sd_name)
            if value.ndim == 2:  # LDM keeps the attention projections as 1x1 convs
                value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP text encoder (SD 1.x, SDXL's first): same names under `prefix`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); LDM files have it.
        name = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + name] = value
    return out


_OPEN_CLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text encoder (SD 2.x, SDXL's second) in the `open_clip` layout under `prefix`."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            _, _, index, rest = key.split(".", 3)
            base = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                proj, kind = rest.split(".")[1:3]
                qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
                continue
            for hf, sd in _OPEN_CLIP_LAYER:
                if rest.startswith(hf):
                    rest = sd + rest[len(hf) :]
                    break
            out[base + rest] = value
        elif key == "embeddings.position_ids":
            continue
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict for an SD 1.x / 2.x / XL (base or refiner) diffusers pipeline."""
    out: dict[str, torch.Tensor] = {}
    out.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    out.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if pipe.text_encoder is None:
        # The SDXL refiner: OpenCLIP alone, as the conditioner's first embedder.
        out.update(
            open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.0.model.")
        )
        return {k: v.detach().contiguous() for k, v in out.items()}
    te = {k: v for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        out.update(
            open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
        )
    elif pipe.text_encoder.config.hidden_act == "gelu":
        # SD 2.x ships OpenCLIP ViT-H (plain gelu); OpenAI CLIP uses quick_gelu.
        out.update(open_clip_to_ldm(te, "cond_stage_model.model."))
    else:
        out.update(clip_to_ldm(te, "cond_stage_model.transformer."))
    return {k: v.detach().contiguous() for k, v in out.items()}
