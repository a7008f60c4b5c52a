"""Field values as A1111 clients send them: "unset" sentinels and lax scalars (pure: no torch).

Two habits of real clients, handled in one place so every parser reads them alike:

- **Sentinels.** A1111 and its extensions spell "not set, use the default"
  several ways: `None`, `""`, `"None"`, `"none"`, and the UI's dropdown labels
  "Use same checkpoint" / "Use same sampler" / "Use same scheduler" /
  "Use same VAE". `is_unset` is true for all of them.
- **Lax scalars.** The extensions' API models are pydantic models, whose lax
  mode takes `"true"`/`"False"`/`1`/`0` for a boolean and `"0.5"`/`"512"` for a
  number; bots and chat apps that build bodies from text send exactly those.
  `lax_bool` and `lax_number` accept the same spellings and still refuse, with
  the field named, anything else: other strings, non-finite numbers, a
  fraction for an integer field, values out of range.
"""

from __future__ import annotations

import math
from typing import Any

from sdeks.errors import InvalidParameterError

_UNSET = frozenset({"", "none", "null"})
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def is_unset(value: Any) -> bool:
    """None, empty, "None"/"none" or a "Use same ..." label: the field means "the default"."""
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    text = value.strip().lower()
    return text in _UNSET or text.startswith("use same")


def lax_bool(value: Any, where: str) -> bool:
    """A boolean as pydantic's lax mode reads it (true/false, 0/1, "true", "False", "0"...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise InvalidParameterError(f"`{where}` must be true or false, got {value!r:.80}")


def lax_number(
    value: Any,
    where: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
) -> float:
    """A finite number (or a numeric string), in `low`..`high` when given.

    `integer`: a whole number (`512`, `512.0`, `"512"`); a fraction is refused
    rather than truncated. Booleans are refused (a `true` for a weight is a
    client bug, not a number). The result is a float; callers `int()` it.
    """
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    kind = "an integer" if integer else "a number"
    if number is None or not math.isfinite(number):
        raise InvalidParameterError(f"`{where}` must be {kind}, got {value!r:.80}")
    if integer and not number.is_integer():
        raise InvalidParameterError(f"`{where}` must be {kind}, got {value!r:.80}")
    if (low is not None and number < low) or (high is not None and number > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise InvalidParameterError(f"`{where}` must be between {lo} and {hi}, got {value!r:.80}")
    return number


def lax_index(value: Any) -> Any:
    """ "0".."9" as the int it spells, anything else unchanged: the extensions' pydantic
    enums take an index as a number or as its digit (`resize_mode: "0"`)."""
    text = value.strip() if isinstance(value, str) else ""
    if len(text) == 1 and text in "0123456789":  # ASCII only: int("２") is 2 too
        return int(text)
    return value
