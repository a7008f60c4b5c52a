"""benchmarks/scheduling.py --live --quick: the real dispatcher, moto and sleeping pods."""

from __future__ import annotations

import re


def test_scheduling_live_quick_ends_with_the_headline(benchmark):
    out = benchmark("scheduling.py", "--live", "--quick")

    assert re.fullmatch(r"affinity/fifo throughput at S=10: \d+\.\d\d \(live\)", out.last)
    assert out.number(r"at S=10: (\d+\.\d+) \(live\)") > 0
    rows = out.rows("10")  # S, policy, run, throughput, makespan, bound, ...
    assert sorted((r[1], r[2]) for r in rows) == [
        ("affinity", "live"),
        ("affinity", "sim"),
        ("fifo", "live"),
        ("fifo", "sim"),
        ("holder-first", "sim"),
    ]
    for row in rows:
        throughput, makespan, bound = float(row[3]), float(row[4]), float(row[5])
        assert throughput > 0
        assert makespan >= bound * 0.99  # nothing beats the lower bound (rounded in the table)
        # Every task ran exactly once: throughput x makespan = the 200 tasks.
        assert abs(throughput * makespan - 200) < 200 * 0.02
