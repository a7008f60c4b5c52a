"""benchmarks/scheduling.py --quick: the simulated comparison."""

from __future__ import annotations

import re


def test_scheduling_quick_ends_with_the_headline(benchmark):
    out = benchmark("scheduling.py", "--quick")

    assert re.fullmatch(r"affinity/fifo throughput at S=10: \d+\.\d\d", out.last)
    assert out.number(r"at S=10: (\d+\.\d+)$") > 0
    # One fifo and one affinity row per switch cost, in the burst table and the steady one.
    assert len(out.rows("10")) == 4
