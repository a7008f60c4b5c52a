"""Prompts as A1111 reads them: emphasis weights, `BREAK`, and no 77-token limit.

A1111 (`modules/prompt_parser.py`, `sd_hijack_clip.py`):

- `(word)` multiplies the attention weight by 1.1, `[word]` divides it by 1.1,
  `(word:1.5)` sets a factor; `\\(` is a literal bracket.
- The prompt is cut into chunks of 75 tokens (`BREAK` starts a new one);
  each chunk is encoded on its own between BOS/EOS and the chunks are
  concatenated, so long prompts are not truncated.
- Token embeddings are scaled by their weights, then the whole is rescaled to
  the original mean, so emphasis shifts attention without changing the
  overall magnitude.

diffusers' own `encode_prompt` does none of this (plain text, truncated at 77
tokens), so the renderer passes `prompt_embeds` built here. For a short plain
prompt the result equals diffusers' encoding. A1111's comma back-tracking
(moving the last words before a chunk boundary into the next chunk) is not
done.
"""

from __future__ import annotations

import re
from typing import Any

CHUNK_TOKENS = 75
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# A1111 `prompt_parser.re_attention`.
_ATTENTION_RE = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = "BREAK"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's parser: the prompt as (text, weight) runs; `("BREAK", -1)` marks a break.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION_RE.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, piece in enumerate(_BREAK_RE.split(part)):
                if i > 0:
                    res.append([BREAK, -1])
                res.append([piece, 1.0])
    for pos in round_brackets:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    i = 0  # merge neighbours of equal weight
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


def chunk_tokens(
    runs: list[tuple[list[int], float]], chunk: int = CHUNK_TOKENS
) -> list[tuple[list[int], list[float]]]:
    """Token runs (ids without BOS/EOS, weight; weight -1 = BREAK) -> chunks of at most
    `chunk` tokens with their weights. Always at least one (maybe empty) chunk."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for tokens, weight in runs:
        if weight == -1:  # BREAK: close the current chunk
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in tokens:
            if len(ids) == chunk:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def tokenize(tokenizer: Any, prompt: str) -> list[tuple[list[int], list[float]]]:
    """Prompt -> chunks of (token ids, weights), no special tokens yet."""
    runs = [
        ([], -1.0)
        if weight == -1
        else (tokenizer(text, add_special_tokens=False).input_ids, weight)
        for text, weight in parse_prompt_attention(prompt)
    ]
    return chunk_tokens(runs)


def check_length(field: str, chunks: list[tuple[list[int], list[float]]], max_chunks: int) -> None:
    """Each chunk is one more pass through the text encoder and 77 more tokens every
    denoising step attends to: a runtime caps them (issue 14: a 230 KB prompt made a
    render 160x slower)."""
    if len(chunks) > max_chunks:
        from sdeks.errors import InvalidParameterError

        tokens = sum(len(ids) for ids, _ in chunks)
        raise InvalidParameterError(
            f"`{field}` is {len(chunks)} chunks of {CHUNK_TOKENS} tokens ({tokens} tokens), "
            f"over this runtime's limit of {max_chunks} chunks"
        )


def _padded(tokenizer: Any, ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    body = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    full_weights = [1.0, *weights, 1.0]
    return body + [pad] * (length - len(body)), full_weights + [1.0] * (length - len(body))


def _weighted(hidden: Any, weights: Any) -> Any:
    """Scale each token by its weight, then restore the original mean (A1111)."""
    if bool((weights == 1.0).all()):
        return hidden  # nothing emphasised: exactly the plain encoding
    # In float32: fp16 means over 77 x 2048 values lose too much precision.
    values = hidden.float()
    original = values.mean()
    scaled = values * weights.reshape(1, -1, 1).float()
    return (scaled * (original / scaled.mean())).to(hidden.dtype)


def _final_norm(encoder: Any) -> Any:
    # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x has it.
    return getattr(encoder, "text_model", encoder).final_layer_norm


def encode(
    pipe: Any,
    prompt: str,
    negative_prompt: str,
    clip_skip: int | None,
    batch: int,
    *,
    max_chunks: int | None = None,
) -> dict[str, Any]:
    """`prompt_embeds` (and SDXL's pooled embeds) for prompt and negative prompt, `batch` copies.

    `clip_skip` counts skipped layers as diffusers does (A1111's
    CLIP_stop_at_last_layers minus one). `max_chunks`: the runtime's prompt cap
    (`SDEKS_MAX_PROMPT_CHUNKS`); a longer prompt is refused before any encoding.
    """
    import torch

    # The SDXL refiner has the second tokenizer and encoder only; the two tokenizers
    # of an SDXL base split words alike (same BPE), so either gives the chunks.
    tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
    cond = tokenize(tokenizer, prompt)
    uncond = tokenize(tokenizer, negative_prompt)
    if max_chunks is not None:
        check_length("prompt", cond, max_chunks)
        check_length("negative_prompt", uncond, max_chunks)
    # Both sides need the same length: pad the shorter with empty chunks (A1111).
    while len(cond) < len(uncond):
        cond.append(([], []))
    while len(uncond) < len(cond):
        uncond.append(([], []))

    xl = getattr(pipe, "text_encoder_2", None) is not None
    with torch.inference_mode():
        if not xl:
            embeds = _encode_sd(pipe, cond, clip_skip)
            negative = _encode_sd(pipe, uncond, clip_skip)
            return {
                "prompt_embeds": embeds.repeat(batch, 1, 1),
                "negative_prompt_embeds": negative.repeat(batch, 1, 1),
            }
        embeds, pooled = _encode_xl(pipe, cond, clip_skip)
        if not negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
            # diffusers' SDXL default: an empty negative prompt is zeros, not "".
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative, negative_pooled = _encode_xl(pipe, uncond, clip_skip)
    return {
        "prompt_embeds": embeds.repeat(batch, 1, 1),
        "negative_prompt_embeds": negative.repeat(batch, 1, 1),
        "pooled_prompt_embeds": pooled.repeat(batch, 1),
        "negative_pooled_prompt_embeds": negative_pooled.repeat(batch, 1),
    }


def _encode_sd(
    pipe: Any, chunks: list[tuple[list[int], list[float]]], clip_skip: int | None
) -> Any:
    import torch

    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    device = encoder.device
    parts = []
    for ids, weights in chunks:
        padded_ids, padded_weights = _padded(tokenizer, ids, weights)
        input_ids = torch.tensor([padded_ids], device=device)
        if clip_skip:
            out = encoder(input_ids, output_hidden_states=True)
            hidden = _final_norm(encoder)(out.hidden_states[-(clip_skip + 1)])
        else:
            hidden = encoder(input_ids)[0]
        parts.append(_weighted(hidden, torch.tensor(padded_weights, device=device)))
    return torch.cat(parts, dim=1).to(dtype=encoder.dtype)


def _encode_xl(
    pipe: Any, chunks: list[tuple[list[int], list[float]]], clip_skip: int | None
) -> tuple[Any, Any]:
    """SDXL: both encoders' penultimate (or `clip_skip`) layers side by side; the pooled
    embedding of the second encoder from the first chunk, as A1111. The SDXL
    refiner has the second encoder alone: its layer and pooled embedding."""
    import torch

    layer = -(clip_skip + 2) if clip_skip else -2
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    pairs = [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]
    pooled = None
    parts = []
    for ids, weights in chunks:
        per_encoder = []
        for tokenizer, encoder in pairs:
            padded_ids, padded_weights = _padded(tokenizer, ids, weights)
            input_ids = torch.tensor([padded_ids], device=encoder.device)
            out = encoder(input_ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            per_encoder.append(out.hidden_states[layer])
        hidden = torch.cat(per_encoder, dim=-1)
        weight_tensor = torch.tensor(padded_weights, device=hidden.device)
        parts.append(_weighted(hidden, weight_tensor))
    return torch.cat(parts, dim=1), pooled
