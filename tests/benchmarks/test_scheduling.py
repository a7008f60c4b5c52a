"""benchmarks/scheduling.py --quick: the simulated comparison."""

from __future__ import annotations

import re


def test_scheduling_quick_ends_with_the_headline(benchmark):
    out = benchmark("scheduling.py", "--quick")

    assert re.fullmatch(r"affinity/fifo throughput at S=10: \d+\.\d\d", out.last)
    assert out.number(r"at S=10: (\d+\.\d+)$") > 0
    # One fifo and one affinity row per switch cost, in the burst table and the steady one,
    # then one windowed affinity row per window size and one with every task visible.
    rows = out.rows("10")
    assert [r[1] for r in rows[:4]] == ["fifo", "affinity", "fifo", "affinity"]
    assert [r[1] for r in rows[4:]] == ["64", "128", "256", "512 (default)", "1000", "all"]
    # The unlimited row is the burst's affinity row; a window never sees more than all.
    assert rows[-1][2] == rows[1][2]
    # 200 tasks fit in the default window: it sees them all, as the unlimited policy does.
    windowed = out.number(r"with the default window \(512\) at S=10: affinity/fifo (\d+\.\d+)")
    assert windowed == out.number(r"affinity/fifo throughput at S=10: (\d+\.\d+)$")
