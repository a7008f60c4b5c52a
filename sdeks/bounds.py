"""Bounds at the edge: what every service checks once, before anything is stored or
forwarded, and the one way error messages quote untrusted input (issue 14).

    excerpt(value)          a short, escaped excerpt of untrusted input for an error message
    find_unencodable(doc)   the path of the first string (or dict key) UTF-8 cannot encode
    scrub(doc)              `doc` with lone surrogates replaced by U+FFFD (for echoing it)
    check_content(content)  integer fields and their products in range, numbers finite

The rules (docs/security.md, "Bounds at the edge"):

- Text must be Unicode that UTF-8 can encode. JSON may spell a lone surrogate
  (``"\\ud800"``); such a string in `content` or `context` (value or key) is
  refused with ``invalid_parameter`` naming the field. What a failed callback
  echoes is scrubbed (U+FFFD), so the failure itself always serialises.
- Numbers must be finite (Python's json reads ``NaN`` and ``Infinity``; JSON
  has neither) and integers within 64 bits, anywhere in `content`.
- The A1111 integer fields (`INTEGER_FIELDS`) must be integers (not booleans,
  not fractions) within hard ceilings, and the products that size the work
  (``batch_size x n_iter``, ``width x height``) too. These ceilings only keep
  absurd values out of the task table, the job and the pod; each runtime then
  applies its own, tighter limits (docs/runtime.md) with the same error code.

Error messages never embed raw input: `excerpt` keeps at most `EXCERPT_CHARS`
characters, escapes what is not printable (newlines, NULs, surrogates) and
says how long the value was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from sdeks.errors import InvalidParameterError

if TYPE_CHECKING:
    from sdeks.envelope import Task

#: Characters of untrusted input an error message quotes.
EXCERPT_CHARS = 60
#: Integers anywhere in `content` must fit in 64 bits (signed or unsigned).
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
#: Seeds: -1 (random) or 0..2**64 - 1, as torch generators take them.
MAX_SEED = 2**64 - 1

#: Hard ceilings of the A1111 integer fields, (min, max); pods apply tighter limits.
INTEGER_FIELDS: dict[str, tuple[int, int]] = {
    "steps": (1, 10_000),
    "batch_size": (1, 1_000),
    "n_iter": (1, 1_000),
    "width": (1, 65_536),
    "height": (1, 65_536),
    "seed": (-1, MAX_SEED),
    "subseed": (-1, MAX_SEED),
    "seed_resize_from_h": (-1, 65_536),
    "seed_resize_from_w": (-1, 65_536),
    "firstphase_width": (0, 65_536),
    "firstphase_height": (0, 65_536),
    "hr_second_pass_steps": (0, 10_000),
    "hr_resize_x": (0, 65_536),
    "hr_resize_y": (0, 65_536),
    "resize_mode": (0, 3),
    "mask_blur": (0, 1_024),
    "mask_blur_x": (0, 1_024),
    "mask_blur_y": (0, 1_024),
    "inpainting_fill": (0, 3),
    "inpaint_full_res_padding": (0, 65_536),
    "inpainting_mask_invert": (0, 1),
    "upscaling_resize_w": (1, 65_536),
    "upscaling_resize_h": (1, 65_536),
}
#: Images one task may ask for (batch_size x n_iter), and pixels per image.
MAX_IMAGES = 1_000
MAX_PIXELS = 16_384 * 16_384

_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_INT_TEXT_RE = re.compile(r"[+-]?[0-9]{1,40}")


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, escaped, quoted excerpt of untrusted `value` for an error message.

    Strings keep their first `limit` characters, with anything unprintable
    escaped (``\\n``, ``\\x00``, ``\\ud800``) and the full length noted when
    cut; other values show their type (and a short form of small scalars).
    The result is ASCII-safe to serialise and at most ``10 * limit + 40``
    characters whatever the input.
    """
    if isinstance(value, str):
        head = escape(value[:limit])
        if len(value) > limit:
            return f'"{head}..." ({len(value)} characters)'
        return f'"{head}"'
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, int):
        if value.bit_length() > 128:
            return f"an integer of {value.bit_length()} bits"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return f"an object of {len(value)} keys"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    return f"a {type(value).__name__}"


def escape(text: str, limit: int | None = None) -> str:
    """`text` (its first `limit` characters, then "...") with every unprintable character
    escaped: newlines, NULs, other controls and lone surrogates. Printable characters,
    backslashes included, are kept as they are (no doubling)."""
    cut = limit is not None and len(text) > limit
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit])
    return shown + "..." if cut else shown


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any, bool]]:
    """(path, item, is_key) for every value and dict key below `value`, iteratively."""
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        yield where, item, False
        if isinstance(item, Mapping):
            for k, v in item.items():
                yield f"{where}.{k}" if isinstance(k, str) else where, k, True
                stack.append((f"{where}.{k}", v))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))


def has_surrogates(text: str) -> bool:
    return _SURROGATE_RE.search(text) is not None


def find_unencodable(value: Any, path: str) -> str | None:
    """The path of the first string or key in `value` that UTF-8 cannot encode, else None."""
    for where, item, _ in _walk(value, path):
        if isinstance(item, str) and has_surrogates(item):
            return where
    return None


def scrub(value: Any) -> Any:
    """`value` with every lone surrogate (in strings and keys) replaced by U+FFFD:
    what a callback echoes must serialise even when the input did not."""
    if isinstance(value, str):
        return _SURROGATE_RE.sub("\ufffd", value) if has_surrogates(value) else value
    if isinstance(value, Mapping):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def check_text(value: Any, path: str) -> None:
    where = find_unencodable(value, path)
    if where is not None:
        raise InvalidParameterError(
            f"`{_short_path(where)}` holds text that is not valid Unicode (a lone surrogate); "
            "send UTF-8 text"
        )


def check_numbers(value: Any, path: str) -> None:
    """Finite numbers and 64-bit integers anywhere below `value`."""
    for where, item, is_key in _walk(value, path):
        if is_key or isinstance(item, bool):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidParameterError(
                f"`{_short_path(where)}` must be a finite number, got {excerpt(item)}"
            )
        if isinstance(item, int) and not MIN_INT <= item <= MAX_INT:
            raise InvalidParameterError(
                f"`{_short_path(where)}` must fit in 64 bits, got {excerpt(item)}"
            )


def integer_field(content: Mapping[str, Any], name: str) -> int | None:
    """The integer value of A1111 field `name` (absent: None), as pydantic would read it,
    refusing what it would not (booleans, fractions, text that is not a number) and
    anything outside `INTEGER_FIELDS`."""
    if name not in content or content[name] is None:
        return None
    value = content[name]
    low, high = INTEGER_FIELDS[name]
    if isinstance(value, bool):
        raise InvalidParameterError(
            f"`{name}` must be an integer, got a boolean ({excerpt(value)})"
        )
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidParameterError(f"`{name}` must be an integer, got {excerpt(value)}")
        if not low <= value <= high:
            raise InvalidParameterError(f"`{name}` must be {low}..{high}, got {excerpt(value)}")
        value = int(value)
    elif isinstance(value, str):
        if not _INT_TEXT_RE.fullmatch(value.strip()):
            raise InvalidParameterError(f"`{name}` must be an integer, got {excerpt(value)}")
        value = int(value.strip())
    elif not isinstance(value, int):
        raise InvalidParameterError(f"`{name}` must be an integer, got {excerpt(value)}")
    if not low <= value <= high:
        raise InvalidParameterError(f"`{name}` must be {low}..{high}, got {excerpt(value)}")
    return value


def count_of(content: Mapping[str, Any], fields: Mapping[str, int]) -> int | None:
    """The product of integer fields (name -> A1111 default when absent), read as
    `integer_field` reads them; None when one is not a valid integer. For estimates
    (planned steps, images) that must agree with what the pod will run."""
    total = 1
    for name, default in fields.items():
        try:
            value = integer_field(content, name)
        except InvalidParameterError:
            return None
        total *= default if value is None else value
    return total


def check_content(content: Mapping[str, Any]) -> None:
    """Integer fields, their products and every number in `content` within bounds."""
    values = {name: integer_field(content, name) for name in INTEGER_FIELDS}
    check_numbers(content, "content")
    batch, n_iter = values["batch_size"] or 1, values["n_iter"] or 1
    if batch * n_iter > MAX_IMAGES:
        raise InvalidParameterError(
            f"`batch_size` x `n_iter` is {batch}x{n_iter} = {batch * n_iter} images, "
            f"over the limit of {MAX_IMAGES}"
        )
    width, height = values["width"] or 512, values["height"] or 512
    if width * height > MAX_PIXELS:
        raise InvalidParameterError(
            f"`width` x `height` is {width}x{height} = {width * height} pixels, "
            f"over the limit of {MAX_PIXELS}"
        )
    for name in ("seed", "subseed"):
        seed = values[name]
        # Image i renders with seed + i: the last one must still be a valid seed.
        if seed is not None and seed >= 0 and seed + batch * n_iter - 1 > MAX_SEED:
            raise InvalidParameterError(
                f"`{name}` {seed} + {batch * n_iter} images passes the largest seed {MAX_SEED}"
            )


def check_task(task: Task) -> None:
    """Every edge bound of a parsed task; `InvalidParameterError` names the field."""
    check_text(task.context, "context")
    check_text(task.content, "content")
    check_content(task.content)


def _short_path(path: str) -> str:
    """A field path for a message (dict keys in it are untrusted too)."""
    return escape(path, 120)
