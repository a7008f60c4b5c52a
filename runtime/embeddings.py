"""Textual-inversion embeddings from `embeddings/` in the models bucket, used as A1111 does:
an embedding is active in a render when its name appears as a word in the
prompt or negative prompt (the file name without its suffix: `bad-hands-5`).

Formats (what A1111 reads):

- SD 1.x/2.x `.pt`/`.bin`: A1111's `{"string_to_param": {"*": tensor[n, dim]}, ...}`
  (read with torch's weights-only loader: no code runs), or diffusers'
  `{"<token>": tensor}`;
- SD 1.x/2.x `.safetensors`: `emb_params` (`tensor[n, dim]`), or one tensor;
- SDXL `.safetensors`: `clip_l` (`[n, 768]`) and `clip_g` (`[n, 1280]`).

Files are a model-store kind (`EMBEDDING`): listed from `embeddings/`,
cached in the disk and RAM tiers like every other weight, never loaded per
request. For a render that uses some, stage 2 adds their vectors to the job's
tokenizers and text encoders (diffusers `load_textual_inversion`; an
`n`-vector embedding becomes tokens `name name_1 ...`) and removes them when
the render ends; the render holds the weights exclusively meanwhile, as with
LoRAs. An embedding whose width does not match the checkpoint's text encoder
is skipped, as A1111 skips it (its name stays plain text).
"""

from __future__ import annotations

import logging
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sdeks.errors import InvalidParameterError

log = logging.getLogger(__name__)

EMBEDDINGS_PREFIX = "embeddings/"


def load_embedding(path: Path, entry: Any = None) -> dict[str, Any]:
    """The vectors of an embedding file: {"vectors": [n, dim]} or {"clip_l", "clip_g"}."""
    import torch

    name = getattr(entry, "name", path.name)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidParameterError(
            f"embedding {name!r} could not be read: {type(exc).__name__}: {exc}"[:400]
        ) from exc
    if not isinstance(data, dict):
        if isinstance(data, torch.Tensor):
            data = {"emb_params": data}
        else:
            raise InvalidParameterError(f"embedding {name!r} is not an embedding file")
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": _matrix(data["clip_l"]), "clip_g": _matrix(data["clip_g"])}
    if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        return {"vectors": _matrix(next(iter(data["string_to_param"].values())))}
    if "emb_params" in data:
        return {"vectors": _matrix(data["emb_params"])}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return {"vectors": _matrix(tensors[0])}
    raise InvalidParameterError(
        f"embedding {name!r}: no string_to_param, emb_params or clip_l/clip_g vectors in it"
    )


def _matrix(tensor: Any) -> Any:
    tensor = tensor.detach().float().cpu()
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor.reshape(-1, tensor.shape[-1])


def _kind() -> Any:
    from runtime.model_store import ModelKind

    return ModelKind(
        "embedding",
        folders=(EMBEDDINGS_PREFIX,),
        load=load_embedding,
        suffixes=(".safetensors", ".pt", ".bin"),
        to_device=lambda obj, _device, _dtype: obj,  # vectors are copied into the encoders
    )


_EMBEDDING: Any = None


def kind() -> Any:
    """The model-store kind of embeddings (built once, on first use)."""
    global _EMBEDDING
    if _EMBEDDING is None:
        _EMBEDDING = _kind()
    return _EMBEDDING


def available(models: Any) -> list[Any]:
    entries = getattr(models, "entries", None)
    if entries is None:
        return []
    return list(entries(kind()))


def name_of(entry: Any) -> str:
    return Path(str(entry.model_name)).name


def used_in(models: Any, *texts: str) -> list[Any]:
    """The embeddings whose names appear as words in `texts` (A1111: by token)."""
    found: list[Any] = []
    joined = "\n".join(texts)
    if not joined.strip():
        return found
    for entry in available(models):
        word = re.escape(name_of(entry))
        if re.search(rf"(?<![\w-]){word}(?![\w-])", joined):
            found.append(entry)
    return found


def attach(pipe: Any, models: Any, entries: list[Any], stack: ExitStack) -> list[str]:
    """Add `entries`' vectors to `pipe`'s tokenizers/text encoders until `stack` closes.

    Returns the infotext's "TI hashes" items (`name: hash`) of those used."""
    hashes: list[str] = []
    xl = getattr(pipe, "text_encoder_2", None) is not None
    # Both SDXL encoders read the same token ids (`runtime.prompts`): an embedding goes
    # into both (clip_l, clip_g) or into neither.
    pairs = (
        [("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g")]
        if xl
        else [("tokenizer", "text_encoder", "vectors")]
    )
    for entry in entries:
        lease = stack.enter_context(models.use_weights(kind(), entry))
        vectors = lease.model
        name = name_of(entry)
        fits = []
        for tok_name, enc_name, key in pairs:
            tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
            matrix = vectors.get(key)
            if tokenizer is None or encoder is None or matrix is None:
                break
            if matrix.shape[-1] != encoder.get_input_embeddings().weight.shape[-1]:
                break
            if name in tokenizer.get_vocab():
                break
            fits.append((tokenizer, encoder, matrix))
        loaded_any = len(fits) == len(pairs)
        for tokenizer, encoder, matrix in fits if loaded_any else []:
            pipe.load_textual_inversion(
                matrix.to(encoder.dtype) if matrix.shape[0] > 1 else matrix[0].to(encoder.dtype),
                token=name,
                tokenizer=tokenizer,
                text_encoder=encoder,
            )
            stack.callback(_unload, pipe, tokenizer, encoder)
        if loaded_any:
            sha = getattr(entry, "sha256", None)
            hashes.append(f"{name}: {sha[:12]}" if sha else name)
        else:
            log.info("embedding %s does not fit this checkpoint's text encoders; skipped", name)
    return hashes


def _unload(pipe: Any, tokenizer: Any, encoder: Any) -> None:
    try:
        pipe.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)
    except Exception:  # the shared encoder must not keep a job's tokens; say so loudly
        log.exception("could not remove textual-inversion tokens")
        raise


def convert(pipe: Any, text: str, tokenizer_name: str = "tokenizer") -> str:
    """`text` with each multi-vector embedding's name expanded to its tokens."""
    tokenizer = getattr(pipe, tokenizer_name, None)
    convert_prompt = getattr(pipe, "maybe_convert_prompt", None)
    if (
        tokenizer is None
        or convert_prompt is None
        or not getattr(tokenizer, "added_tokens_encoder", None)
    ):
        return text
    result: str = convert_prompt(text, tokenizer)
    return result


def listing(models: Any) -> dict[str, Any]:
    """`/sdapi/v1/embeddings`: A1111's `{"loaded": {name: {...}}, "skipped": {}}`."""
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for entry in available(models):
        name = name_of(entry)
        try:
            with models.use_weights(kind(), entry) as lease:
                vectors = lease.model
        except Exception as exc:  # a bad file is listed as skipped, not a failed listing
            skipped[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        first = vectors.get("vectors", vectors.get("clip_l"))
        loaded[name] = {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": int(first.shape[-1]),
            "vectors": int(first.shape[0]),
        }
    return {"loaded": loaded, "skipped": skipped}
