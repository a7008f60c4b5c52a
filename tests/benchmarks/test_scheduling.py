"""benchmarks/scheduling.py --quick: the simulated comparison."""

from __future__ import annotations

import re


def test_scheduling_quick_ends_with_the_headline(benchmark):
    out = benchmark("scheduling.py", "--quick")

    assert re.fullmatch(r"affinity/fifo throughput at S=10: \d+\.\d\d", out.last)
    assert out.number(r"at S=10: (\d+\.\d+)$") > 0
    # One fifo, holder-first and affinity row per switch cost, in the burst table and the
    # steady one, then one windowed affinity row per window size and one with every task visible.
    rows = out.rows("10")
    policies = ["fifo", "holder-first", "affinity"]
    assert [r[1] for r in rows[:6]] == policies * 2
    # the default window for 4 pods is the window's minimum (1024)
    assert [r[1] for r in rows[6:]] == ["64", "128", "256", "512", "1000", "1024 (default)", "all"]
    # The unlimited row is the burst's affinity row; a window never sees more than all.
    assert rows[-1][2] == rows[2][2]
    # 200 tasks fit in the default window: it sees them all, as the unlimited policy does.
    windowed = out.number(r"with the default window \(1024\) at S=10: affinity/fifo (\d+\.\d+)")
    assert windowed == out.number(r"affinity/fifo throughput at S=10: (\d+\.\d+)$")


def test_scheduling_quick_fleet_table_and_cpu(benchmark):
    out = benchmark("scheduling.py", "--quick", "--fleet-only")
    # quick: 2 sizes x 1 exponent x 2 arrival kinds x 2 replica counts
    rows = out.rows("4/8/200") + out.rows("16/32/800")
    assert len(rows) == 8
    assert sorted({(r[2], r[3]) for r in rows}) == [
        ("burst", "1"),
        ("burst", "2"),
        ("poisson 80%", "1"),
        ("poisson 80%", "2"),
    ]
    for row in rows:
        fifo, holder, ours = (float(row[i]) for i in (-9, -8, -7))
        assert min(fifo, holder, ours) >= 0.99  # nobody beats the lower bound
        assert ours < fifo
        # without the shared view: run for several replicas, the same as affinity for one
        alone = row[-6]
        assert alone == "=" if row[3] == "1" else float(alone) >= 0.99
    worst = out.number(r"fleet: affinity makespan / lower bound at most (\d+\.\d+)")
    assert worst == max(float(r[-7]) for r in rows)
    assert out.rows("512") and out.rows("2048")  # the CPU table, one row per window
