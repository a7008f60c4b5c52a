"""A fixture for runtime test modules: render with one torch thread.

On a busy 2-core machine (tests of other packages running beside these),
torch's default of one OpenMP thread per core spins against the other
processes and makes the tiny 64x64 renders ~20x slower; one thread avoids it.
Import it into a test module: ``from tests.runtime.torch_threads import one_torch_thread``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
