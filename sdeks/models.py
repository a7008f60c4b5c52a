"""`sdeks models list`: what a stack's models bucket holds, under the names tasks use.

The names come from the runtime's own catalog (`runtime.model_catalog`, no
torch): A1111's rule, a model is named after its file or folder under
`Stable-diffusion/` (`Lora/`, `VAE/`), so what this lists is exactly what
`sd_model_checkpoint` may say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRow:
    kind: str  # checkpoint, lora, vae
    name: str
    key: str
    size: int

    @property
    def size_text(self) -> str:
        size = float(self.size)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if size < 1024 or unit == "GiB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
        raise AssertionError("unreachable")


def list_models(s3: Any, bucket: str, prefix: str = "") -> list[ModelRow]:
    """Checkpoints, then LoRAs and VAEs, of `s3://bucket/prefix`. Raises
    `ModelNotFoundError` when the bucket does not exist."""
    from runtime.model_catalog import Catalog
    from runtime.model_source import S3Source

    source = S3Source(s3, bucket, prefix)
    catalog = Catalog(source.list(""), source=source.url)
    rows: list[ModelRow] = []
    for kind, entries in (
        ("checkpoint", catalog.checkpoints),
        ("lora", catalog.loras),
        ("vae", catalog.vaes),
    ):
        rows.extend(ModelRow(kind, e.name, e.key, e.size) for e in entries)
    return rows
