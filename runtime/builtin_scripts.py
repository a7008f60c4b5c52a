"""A1111's built-in alwayson scripts, and switched-off entries, in `alwayson_scripts` (pure).

Clients that copy A1111's UI state (webuiapi, bots, chat apps) send an entry
for every script on every call, most of them switched off. Two rules make
such bodies render instead of being refused:

- **Switched-off entries are no-ops.** `{}`, `{"args": []}`, `{"args": null}`,
  and `{"args": [false, ...]}` (A1111's convention: `args[0]` false is "off")
  do nothing, whatever the script; `inert_scripts` names them so the
  manifest's `ignored_fields` can list the ones no stage reads.
- **A1111's own scripts map onto the body's fields** (`apply`, stage 1), as
  their `setup()` does in A1111 (`modules/processing_scripts/*.py`):

  - `Refiner` `[enabled, checkpoint, switch_at]` -> `refiner_checkpoint`,
    `refiner_switch_at` (enabled with a checkpoint set);
  - `Seed` `[seed, extra, subseed, subseed_strength, resize_w, resize_h]` ->
    `seed` (when not -1), and with `extra` true `subseed`/`subseed_strength`
    (strength > 0) and `seed_resize_from_w/h` (both > 0);
  - `Sampler` `[steps, sampler_name, scheduler]` -> `steps`, `sampler_name`,
    `scheduler`.

  A value that disagrees with the same field sent in the body is refused
  naming both (which one the client meant is unknowable). `Soft inpainting`
  and `Extra options` can only be switched off or empty here: an enabled one
  is refused naming it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from runtime.values import is_unset, lax_bool, lax_number
from sdeks.errors import InvalidParameterError

#: Lower-cased titles of the A1111 scripts `apply` handles.
BUILTIN = ("refiner", "seed", "sampler", "soft inpainting", "extra options")


def args_of(value: Any) -> list[Any] | None:
    """The `args` list of an entry (`{"args": [...]}` or a bare list); None if not a list."""
    if isinstance(value, dict):
        args = value.get("args")
        return [] if args is None else args if isinstance(args, list) else None
    if isinstance(value, list):
        return value
    return [] if value is None else None


def is_inert(value: Any) -> bool:
    """Whether an `alwayson_scripts` entry is empty or switched off (args[0] is false)."""
    args = args_of(value)
    if args is None:
        return False
    return not args or args[0] is False


def inert_scripts(scripts: dict[str, Any], known: Iterable[str]) -> list[str]:
    """Keys of switched-off entries that are neither `known` scripts nor A1111's built-ins."""
    skip = {k.lower() for k in known} | set(BUILTIN)
    return sorted(k for k, v in scripts.items() if k.lower() not in skip and is_inert(v))


def apply(request: Any) -> None:
    """Fold A1111's built-in scripts of `request.alwayson_scripts` into its own fields."""
    for key, value in request.alwayson_scripts.items():
        title = key.lower() if isinstance(key, str) else ""
        if title not in BUILTIN:
            continue
        args = args_of(value)
        where = f"alwayson_scripts.{key}.args"
        if args is None:
            raise InvalidParameterError(f"`{where}` must be a list, got {type(value).__name__}")
        if is_inert(value) or all(a is None for a in args):
            continue
        if title == "refiner":
            _refiner(request, args, where)
        elif title == "seed":
            _seed(request, args, where)
        elif title == "sampler":
            _sampler(request, args, where)
        else:
            raise InvalidParameterError(
                f"`alwayson_scripts.{key}` is switched on ({where}[0] is {args[0]!r:.40}); "
                f"A1111's {key!r} script is not supported by this runtime (send it switched off)"
            )


def _arg(args: list[Any], i: int, default: Any) -> Any:
    return args[i] if i < len(args) and args[i] is not None else default


def _set(request: Any, field: str, value: Any, where: str) -> None:
    """`request.field = value`, unless the body sent a different value for it itself."""
    sent = getattr(request, field)
    if field in request.model_fields_set and sent != value and not _neutral(field, sent):
        raise InvalidParameterError(
            f"`{where}` sets `{field}` to {value!r:.60}, but the body's `{field}` is {sent!r:.60}"
        )
    setattr(request, field, value)


def _neutral(field: str, value: Any) -> bool:
    """Body values that mean "not chosen": the script's value takes their place."""
    if field in ("seed", "subseed", "seed_resize_from_w", "seed_resize_from_h"):
        return value == -1
    if field == "subseed_strength":
        return value == 0
    return is_unset(value)


def _refiner(request: Any, args: list[Any], where: str) -> None:
    enabled = lax_bool(_arg(args, 0, False), f"{where}[0]")
    checkpoint = _arg(args, 1, None)
    if not enabled or is_unset(checkpoint):
        return
    if not isinstance(checkpoint, str) or len(checkpoint) > 300:
        raise InvalidParameterError(
            f"`{where}[1]` must be a checkpoint name, got {checkpoint!r:.80}"
        )
    switch = lax_number(_arg(args, 2, 0.8), f"{where}[2]", low=0, high=1)
    _set(request, "refiner_checkpoint", checkpoint, f"{where}[1]")
    _set(request, "refiner_switch_at", switch, f"{where}[2]")


def _seed(request: Any, args: list[Any], where: str) -> None:
    seed = int(lax_number(_arg(args, 0, -1), f"{where}[0]", integer=True))
    if seed != -1:
        _set(request, "seed", seed, f"{where}[0]")
    if not lax_bool(_arg(args, 1, False), f"{where}[1]"):
        return
    subseed = int(lax_number(_arg(args, 2, -1), f"{where}[2]", integer=True))
    strength = lax_number(_arg(args, 3, 0), f"{where}[3]", low=0, high=1)
    if strength > 0:
        _set(request, "subseed", subseed, f"{where}[2]")
        _set(request, "subseed_strength", strength, f"{where}[3]")
    width = int(lax_number(_arg(args, 4, 0), f"{where}[4]", integer=True))
    height = int(lax_number(_arg(args, 5, 0), f"{where}[5]", integer=True))
    if width > 0 and height > 0:
        _set(request, "seed_resize_from_w", width, f"{where}[4]")
        _set(request, "seed_resize_from_h", height, f"{where}[5]")


def _sampler(request: Any, args: list[Any], where: str) -> None:
    steps = _arg(args, 0, None)
    if steps is not None:
        _set(request, "steps", int(lax_number(steps, f"{where}[0]", integer=True)), f"{where}[0]")
    for i, field in ((1, "sampler_name"), (2, "scheduler")):
        name = _arg(args, i, None)
        if is_unset(name):
            continue
        if not isinstance(name, str) or len(name) > 100:
            raise InvalidParameterError(f"`{where}[{i}]` must be a name, got {name!r:.80}")
        _set(request, field, name, f"{where}[{i}]")
