"""A1111 seed planning (pure) and seeded noise."""

from __future__ import annotations

import random

import pytest

from runtime import seeds
from sdeks.errors import InvalidParameterError


def test_plan_counts_up_from_the_seed():
    plan = seeds.plan_seeds(100, 5, 0.0, 4)
    assert plan.all_seeds == [100, 101, 102, 103]
    assert plan.all_subseeds == [5, 6, 7, 8]
    assert (plan.seed, plan.subseed) == (100, 5)


def test_plan_with_variation_keeps_the_seed_and_counts_subseeds():
    plan = seeds.plan_seeds(100, 5, 0.25, 3)
    assert plan.all_seeds == [100, 100, 100]
    assert plan.all_subseeds == [5, 6, 7]


def test_random_seed_and_subseed_in_a1111_range():
    plan = seeds.plan_seeds(-1, -1, 0.0, 2, rng=random.Random(3))
    assert 0 <= plan.seed < seeds.RANDOM_SEED_LIMIT
    assert 0 <= plan.subseed < seeds.RANDOM_SEED_LIMIT
    assert plan.all_seeds == [plan.seed, plan.seed + 1]
    assert seeds.plan_seeds(None, None, 0.0, 1, rng=random.Random(3)).seed == plan.seed


@pytest.mark.parametrize(
    ("seed", "subseed", "strength", "needle"),
    [
        (-2, 1, 0.0, "`seed`"),
        (1, -7, 0.0, "`subseed`"),
        (1, 1, 1.5, "`subseed_strength`"),
        (2**64 - 1, 1, 0.0, "overflows"),
    ],
)
def test_bad_seeds_are_refused(seed, subseed, strength, needle):
    with pytest.raises(InvalidParameterError, match=needle):
        seeds.plan_seeds(seed, subseed, strength, 2)


def test_noise_depends_on_the_seed_only():
    import torch

    a = seeds.noise(42, (4, 8, 8))
    assert torch.equal(a, seeds.noise(42, (4, 8, 8)))
    assert not torch.equal(a, seeds.noise(43, (4, 8, 8)))


def test_image_noise_slerps_between_seed_and_subseed():
    import torch

    shape = (4, 8, 8)
    base, other = seeds.noise(1, shape), seeds.noise(2, shape)
    assert torch.equal(seeds.image_noise(1, 2, 0.0, shape), base)
    assert torch.allclose(seeds.image_noise(1, 2, 1.0, shape), other, atol=1e-5)
    half = seeds.image_noise(1, 2, 0.5, shape)
    # Spherical interpolation keeps the norm of unit-variance noise (linear would shrink it).
    assert abs(half.norm() - base.norm()) / base.norm() < 0.05
    assert not torch.allclose(half, (base + other) / 2, atol=1e-3)
