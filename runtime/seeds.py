"""Seeds and initial noise as A1111 makes them.

- seed -1 (or absent) draws a random seed; so does subseed -1.
- `all_seeds[i] = seed + i` over batch_size x n_iter images, unless a variation
  strength is set: then every image keeps `seed` and `all_subseeds[i] =
  subseed + i` varies instead (A1111 `processing.process_images_inner`).
- Image i's noise comes from its own seed alone, so it does not depend on its
  place in the batch; with `subseed_strength` s it is
  `slerp(s, noise(seed), noise(subseed))`.

Noise is drawn on the CPU (as diffusers recommends) so a seed gives the same
noise on every device; A1111 draws on the GPU by default, so the same seed
does not give A1111's exact pixels. Planning is pure; only the noise
functions import torch, lazily.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdeks.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

#: A1111 draws random seeds with `random.randrange(4294967294)`.
RANDOM_SEED_LIMIT = 4294967294
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SeedPlan:
    seed: int
    subseed: int
    subseed_strength: float
    all_seeds: list[int]
    all_subseeds: list[int]


def fixed_seed(value: int | None, field: str = "seed", rng: random.Random | None = None) -> int:
    """A1111's `get_fixed_seed`: -1 or None becomes a random seed; others must be in range."""
    if value is None or value == -1:
        return (rng or random).randrange(RANDOM_SEED_LIMIT)
    if value < 0 or value > MAX_SEED:
        raise InvalidParameterError(f"`{field}` must be -1 (random) or 0..{MAX_SEED}, got {value}")
    return value


def plan_seeds(
    seed: int | None,
    subseed: int | None,
    subseed_strength: float,
    count: int,
    rng: random.Random | None = None,
) -> SeedPlan:
    """Seeds for `count` images, numbered in output order."""
    if not 0.0 <= subseed_strength <= 1.0:
        raise InvalidParameterError(
            f"`subseed_strength` must be between 0 and 1, got {subseed_strength}"
        )
    first = fixed_seed(seed, "seed", rng)
    first_sub = fixed_seed(subseed, "subseed", rng)
    varies = subseed_strength > 0
    all_seeds = [first + (0 if varies else i) for i in range(count)]
    all_subseeds = [first_sub + i for i in range(count)]
    for name, values in (("seed", all_seeds), ("subseed", all_subseeds)):
        if values and values[-1] > MAX_SEED:
            raise InvalidParameterError(f"`{name}` {values[0]} + {count - 1} overflows {MAX_SEED}")
    return SeedPlan(first, first_sub, subseed_strength, all_seeds, all_subseeds)


def generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of `shape` (one image, no batch dim) from `seed` alone."""
    import torch

    return torch.randn(shape, generator=generator(seed), dtype=torch.float32)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (t=0) to `high` (t=1), over the whole tensor.

    Nearly parallel inputs fall back to linear interpolation, where slerp's
    `sin(omega)` denominator would vanish.
    """
    import torch

    low_flat, high_flat = low.flatten(), high.flatten()
    dot = torch.dot(low_flat / low_flat.norm(), high_flat / high_flat.norm()).clamp(-1.0, 1.0)
    if dot.abs() > 0.9995:
        return (1.0 - t) * low + t * high
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so) * low + (torch.sin(t * omega) / so) * high


def image_noise(
    seed: int, subseed: int, subseed_strength: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """The initial noise of one image: its seed's, bent toward its subseed's by the strength."""
    base = noise(seed, shape)
    if subseed_strength <= 0:
        return base
    return slerp(subseed_strength, base, noise(subseed, shape))
