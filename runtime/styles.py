"""A1111 prompt styles: `styles.csv` at the root of the models bucket, applied by name.

The file is A1111's own (`name,prompt,negative_prompt`; older files call the
prompt column `text`). A style's prompt holding `{prompt}` has the request's
prompt put there; otherwise it is appended after a comma (A1111's
`merge_prompts`), in the order `styles` lists them, for the prompt and the
negative prompt alike. The file is fetched through the model store (cached
on disk, fetched again when the bucket's copy changes); an unknown style name
is an error naming it and listing those that exist.
"""

from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdeks.errors import InvalidParameterError, ModelNotFoundError

STYLES_KEY = "styles.csv"

_cache: dict[tuple[str, float, int], dict[str, Style]] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def parse(text: str) -> dict[str, Style]:
    """The styles of an A1111 `styles.csv`, by name (file order)."""
    styles: dict[str, Style] = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        name = (row.get("name") or "").strip()
        if not name:
            continue
        prompt = row.get("prompt") if row.get("prompt") is not None else row.get("text")
        styles[name] = Style(name, prompt or "", row.get("negative_prompt") or "")
    return styles


def load(models: Any) -> dict[str, Style]:
    """The bucket's styles; {} when it has no `styles.csv`."""
    try:
        path: Path = models.fetch_file(STYLES_KEY)
    except ModelNotFoundError:
        return {}
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    with _lock:
        if key in _cache:
            return _cache[key]
    styles = parse(path.read_text(encoding="utf-8-sig", errors="replace"))
    with _lock:
        _cache[key] = styles
    return styles


def merge(style_prompt: str, prompt: str) -> str:
    """A1111 `merge_prompts`."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply(models: Any, names: list[str] | None, prompt: str, negative: str) -> tuple[str, str]:
    """`prompt` and `negative` with the styles `names` applied, in order."""
    if not names:
        return prompt, negative
    styles = load(models)
    unknown = [n for n in names if n not in styles]
    if unknown:
        where = (
            f"available: {', '.join(styles)}"
            if styles
            else f"the models bucket has no {STYLES_KEY}"
        )
        raise InvalidParameterError(f"`styles` {unknown} not found ({where})"[:600])
    for name in names:
        prompt = merge(styles[name].prompt, prompt)
        negative = merge(styles[name].negative_prompt, negative)
    return prompt, negative
