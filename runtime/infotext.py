"""A1111 "infotext": the `parameters` text stored in each PNG and in `info.infotexts`.

Format (A1111 `processing.create_infotext`)::

    <prompt>
    Negative prompt: <negative prompt>          (only when not empty)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1, Size: 64x64, ...

Values holding ',', ':' or a newline are JSON-quoted, as A1111's `quote()`
does, so `parse` (A1111's `parse_generation_parameters`) can split them back.
Pure: no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

PNG_TEXT_KEY = "parameters"

# A1111 `infotext_utils.re_param_code`.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return str(json.loads(text))
    except ValueError:
        return text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Params with value None are left out, in the given order (A1111 order by convention)."""
    line = ", ".join(
        f"{key}: {value if key == 'Lora hashes' else quote(value)}"
        for key, value in params.items()
        if value is not None
    )
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse(text: str) -> dict[str, str]:
    """An infotext back into {"Prompt", "Negative prompt", "Steps", ...} (all values strings)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM_RE.findall(last):
        result[key.strip()] = unquote(value.strip())
    return result
