"""CodeFormer files whose VQGAN is not the published size, built from their tensors.

spandrel-extra-arches' CodeFormer loader reads the transformer's sizes off the
state dict (`dim_embd`, `n_layers`, `codebook_size`, which fuse levels exist)
but fixes the VQGAN around it at the published sizes: 512 px faces, 64 base
channels over six levels (x1 2 2 4 4 8), two residual blocks a level,
attention at 16 px, 256-d codes on a 16 x 16 grid, and 8 attention heads (not
readable from the tensors). That VQGAN alone is 63.5 M parameters (255 MB in
float32) and one face through it takes tens of seconds on a laptop CPU, so a
test-sized CodeFormer cannot be one the loader sizes.

Such a file (the tiny one `sdeks models make-tiny --kind faces` writes) is
recognised as CodeFormer by spandrel's own detection, then built here with the
same spandrel-extra-arches class and forward: the VQGAN's sizes are read off
the encoder's blocks, and the fuse points are placed where the published
layout puts them (after a level's last residual block in the encoder, its
first one in the generator). What the class's forward fixes stays fixed: a
16 x 16 grid of 256-d codes, so a file with L levels works on
16 x 2^(L-1) px faces. Published-size files never come here: spandrel loads
them as it does for A1111.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The published VQGAN: (face size, base channels, channel multipliers, residual
#: blocks per level, resolutions with attention).
PUBLISHED_LAYOUT = (512, 64, (1, 2, 2, 4, 4, 8), 2, (16,))
#: Fixed by the class's forward: the code grid's side and the code width.
GRID, CODE_DIM = 16, 256
#: spandrel's choice; the tensors do not tell.
N_HEAD = 8

Layout = tuple[int, int, tuple[int, ...], int, tuple[int, ...]]


def is_codeformer(state: dict[str, Any]) -> bool:
    """Whether spandrel-extra-arches' CodeFormer detection recognises `state` (False
    when the package is not installed)."""
    try:
        from spandrel_extra_arches.architectures.CodeFormer import CodeFormerArch
    except ImportError:
        return False
    return bool(CodeFormerArch().detect(state))


def _block_kind(state: dict[str, Any], prefix: str, index: int) -> str | None:
    head = f"{prefix}.{index}."
    if head + "conv1.weight" in state:
        return "res"
    if head + "q.weight" in state:
        return "attn"
    if head + "conv.weight" in state:
        return "resample"
    if head + "weight" in state:
        return "conv" if state[head + "weight"].ndim == 4 else "norm"
    return None


def read_layout(state: dict[str, Any]) -> Layout:
    """(face size, base channels, multipliers, residual blocks, attention resolutions)
    of a CodeFormer state dict's VQGAN, read off its encoder's blocks."""
    nf = int(state["encoder.blocks.0.weight"].shape[0])
    levels: list[list[str]] = [[]]
    widths: list[int] = []
    index = 1
    while (kind := _block_kind(state, "encoder.blocks", index)) in ("res", "attn", "resample"):
        if kind == "resample":  # a downsample ends a level
            levels.append([])
        else:
            if kind == "res" and "res" not in levels[-1]:
                widths.append(int(state[f"encoder.blocks.{index}.conv1.weight"].shape[0]))
            levels[-1].append(kind)
        index += 1
    # The last level also holds the non-local block (res, attn, res) after its own.
    res_blocks = levels[0].count("res")
    size = GRID * 2 ** (len(levels) - 1)
    attn = [size // 2**i for i, level in enumerate(levels[:-1]) if "attn" in level]
    if levels[-1].count("attn") > 1:
        attn.append(GRID)
    return size, nf, tuple(w // nf for w in widths), res_blocks, tuple(attn)


def fuse_blocks(layout: Layout) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Where the fuse blocks sit, per resolution: encoder block index, generator block
    index, channels. For the published layout these are the class's own tables."""
    size, nf, mult, res_blocks, attn = layout
    encoder: dict[str, int] = {}
    channels: dict[str, int] = {}
    index = 0  # the first conv
    res = size
    for level, m in enumerate(mult):
        for _ in range(res_blocks):
            index += 1
            encoder[str(res)] = index  # after the level's last residual block
            if res in attn:
                index += 1
        channels[str(res)] = nf * m
        if level != len(mult) - 1:
            index += 1
            res //= 2
    generator: dict[str, int] = {}
    index = 3  # the first conv, then the non-local res, attn, res
    for level in reversed(range(len(mult))):
        for block in range(res_blocks):
            index += 1
            # After the first residual block, or before the last attention where a
            # level has attention (as the published tables do at 16 px).
            if block == 0 or res in attn:
                generator[str(res)] = index
            if res in attn:
                index += 1
        if level != 0:
            index += 1
            res *= 2
    return encoder, generator, channels


def _codeformer_class() -> Any:
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    return CodeFormer


def build(
    layout: Layout,
    *,
    dim_embd: int,
    n_layers: int,
    codebook_size: int,
    connect_list: list[str],
) -> Any:
    """spandrel-extra-arches' CodeFormer with the VQGAN of `layout` (random weights)."""
    import torch
    from torch import nn

    codeformer = _codeformer_class()
    module = importlib.import_module(codeformer.__module__)
    size, nf, mult, res_blocks, attn = layout
    if size // 2 ** (len(mult) - 1) != GRID:
        raise ValueError(f"a CodeFormer of {len(mult)} levels works on {GRID}-code grids")
    # The class's __init__ fixes the VQGAN: build its parts at these sizes instead, then
    # set what its forward reads, as its __init__ does.
    model = codeformer.__new__(codeformer)
    module.VQAutoEncoder.__init__(
        model, size, nf, list(mult), "nearest", res_blocks, list(attn), codebook_size
    )
    model.hyperparameters = {}
    model.connect_list = list(connect_list)
    model.n_layers, model.dim_embd, model.dim_mlp = n_layers, dim_embd, dim_embd * 2
    model.position_emb = nn.Parameter(torch.zeros(GRID * GRID, dim_embd))
    model.feat_emb = nn.Linear(CODE_DIM, dim_embd)
    model.ft_layers = nn.Sequential(
        *[
            module.TransformerSALayer(
                embed_dim=dim_embd, nhead=N_HEAD, dim_mlp=dim_embd * 2, dropout=0.0
            )
            for _ in range(n_layers)
        ]
    )
    model.idx_pred_layer = nn.Sequential(
        nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False)
    )
    model.fuse_encoder_block, model.fuse_generator_block, model.channels = fuse_blocks(layout)
    model.fuse_convs_dict = nn.ModuleDict()
    for f_size in connect_list:
        ch = model.channels[f_size]
        model.fuse_convs_dict[f_size] = module.Fuse_sft_block(ch, ch)
    return model


def from_state_dict(state: dict[str, Any]) -> Any | None:
    """The CodeFormer of `state` when its VQGAN is not the published one (which spandrel
    loads itself); None for the published sizes or anything that is not a CodeFormer."""
    if not is_codeformer(state):
        return None
    layout = read_layout(state)
    if layout == PUBLISHED_LAYOUT:
        return None
    from spandrel.util import get_seq_len

    keys = [str(GRID * 2**i) for i in range(len(layout[2]))]
    model = build(
        layout,
        dim_embd=int(state["position_emb"].shape[1]),
        n_layers=get_seq_len(state, "ft_layers"),
        codebook_size=int(state["idx_pred_layer.1.weight"].shape[0]),
        connect_list=[k for k in keys if f"fuse_convs_dict.{k}.scale.0.weight" in state],
    )
    model.load_state_dict(state, strict=True)
    return model
