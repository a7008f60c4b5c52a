"""`/sdapi/v1/options`: A1111's persisted options, validated like request fields (issue 14).

A1111 keeps every option posted to `/sdapi/v1/options` and applies it to
every later generation, so one unchecked value poisons the pod: each later
task fails until someone resets it. Here the options that have an effect are
checked for type and range, against the model they will apply to where the
range depends on it, before anything is stored; a refused call changes
nothing (422 with the field named). Unknown keys are kept, as A1111 keeps
them, but nothing reads them: they are inert.

    validate_options(body, layers=...)   the checked body, or InvalidParameterError

Options with an effect (docs/runtime.md): `sd_model_checkpoint` (a name the
model store knows, checked by the route), `sd_vae` (a name, or Automatic/None),
`CLIP_stop_at_last_layers` (an integer from 1 to the text encoder's depth),
`sdxl_refiner_high_aesthetic_score` / `sdxl_refiner_low_aesthetic_score` (the
SDXL refiner's aesthetic scores for prompt and negative prompt: finite numbers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from sdeks.bounds import excerpt, find_unencodable
from sdeks.errors import InvalidParameterError

#: A1111's slider range of `CLIP_stop_at_last_layers`.
MAX_CLIP_LAYERS = 12
#: The SDXL refiner's aesthetic-score options, with A1111's defaults.
AESTHETIC_OPTIONS = {
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
}
#: Beyond any score a model was trained on (LAION aesthetic scores are 0..10).
MAX_AESTHETIC_SCORE = 1000.0
MAX_NAME_CHARS = 512
#: One call's body: keys and bytes (A1111 posts its whole options dict, a few hundred keys).
MAX_OPTION_KEYS = 1_000
MAX_OPTIONS_BYTES = 256 * 1024


def validate_options(body: Mapping[str, Any], *, layers: int | None = None) -> dict[str, Any]:
    """`body` checked: every known option of the right type and range (`layers`: the text
    encoder depth of the model the options apply to, when known), unknown ones plain JSON."""
    if len(body) > MAX_OPTION_KEYS:
        raise InvalidParameterError(
            f"options: {len(body)} keys, over the limit of {MAX_OPTION_KEYS}"
        )
    where = find_unencodable(dict(body), "options")
    if where is not None:
        raise InvalidParameterError(f"`{where[:120]}` holds text that is not valid Unicode")
    try:
        size = len(json.dumps(body, allow_nan=False, default=str).encode())
    except ValueError as exc:  # NaN/Infinity: Python's JSON parser lets them through
        raise InvalidParameterError(
            "options: NaN and Infinity are not JSON numbers; send finite numbers"
        ) from exc
    if size > MAX_OPTIONS_BYTES:
        raise InvalidParameterError(f"options: {size} bytes, over the limit of {MAX_OPTIONS_BYTES}")
    for name in ("sd_model_checkpoint", "sd_vae"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_NAME_CHARS):
            raise InvalidParameterError(
                f"`{name}` must be a name of at most {MAX_NAME_CHARS} characters, got {excerpt(value)}"
            )
    if "CLIP_stop_at_last_layers" in body:
        clip_layers(body["CLIP_stop_at_last_layers"], layers)
    for name in AESTHETIC_OPTIONS:
        if name in body:
            aesthetic_score(name, body[name])
    return dict(body)


def aesthetic_score(name: str, value: Any) -> float:
    """An aesthetic-score option as a float: a finite number within +-MAX_AESTHETIC_SCORE."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or abs(value) > MAX_AESTHETIC_SCORE
    ):
        raise InvalidParameterError(
            f"`{name}` must be a number from {-MAX_AESTHETIC_SCORE:g} to "
            f"{MAX_AESTHETIC_SCORE:g}, got {excerpt(value)}"
        )
    return float(value)


def clip_layers(value: Any, layers: int | None) -> int:
    """`CLIP_stop_at_last_layers` as an integer within 1..min(12, the encoder's depth)."""
    top = min(MAX_CLIP_LAYERS, layers) if layers else MAX_CLIP_LAYERS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise InvalidParameterError(
            f"`CLIP_stop_at_last_layers` must be an integer from 1 to {top}"
            + (f" (this model's text encoder has {layers} layers)" if layers else "")
            + f", got {excerpt(value)}"
        )
    return value


def encoder_layers(pipeline: Any) -> int | None:
    """The depth of a pipeline's (first) text encoder, if it says."""
    encoder = getattr(pipeline, "text_encoder", None)
    config = getattr(encoder, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    return layers if isinstance(layers, int) and layers > 0 else None
