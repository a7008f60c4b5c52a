"""`tiling` (A1111 "Tiling", seamless textures): circular padding on every conv layer.

A1111 sets `padding_mode = "circular"` on the model's `Conv2d` layers for the
job, so the image wraps around at its edges and tiles without seams; the
VAE's convs too, so the decoded pixels wrap as well. The weights are shared
between jobs, so a tiling render holds them exclusively (`Plan.changes_weights`)
and `circular` restores every layer's mode when the job ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def conv_layers(pipe: Any) -> list[Any]:
    import torch

    layers: list[Any] = []
    for name in ("unet", "vae", "controlnet"):
        module = getattr(pipe, name, None)
        module = getattr(module, "_orig_mod", module)  # a torch.compile wrapper
        if isinstance(module, torch.nn.Module):
            layers.extend(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return layers


@contextmanager
def circular(pipe: Any) -> Iterator[None]:
    """Circular padding on `pipe`'s conv layers for the `with` block, restored after."""
    layers = conv_layers(pipe)
    saved = [layer.padding_mode for layer in layers]
    for layer in layers:
        layer.padding_mode = "circular"
    try:
        yield
    finally:
        for layer, mode in zip(layers, saved, strict=True):
            layer.padding_mode = mode
