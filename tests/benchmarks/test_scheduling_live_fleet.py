"""benchmarks/scheduling_live.py --fleet --quick: 16 pod doubles, two dispatcher processes."""

from __future__ import annotations

import re

from benchmarks.scheduling_live import HEADER


def test_scheduling_live_fleet_quick_runs_every_task_once_through_both_dispatchers(benchmark):
    out = benchmark("scheduling_live.py", "--fleet", "--quick")

    assert re.fullmatch(
        r"affinity makespan / lower bound at S=10, 16 pods, 2 dispatchers: \d+\.\d{3} \(live\)",
        out.last,
    )
    rows = out.rows("10")  # S, policy, run, throughput, makespan, bound, ... shares
    assert sorted((r[1], r[2]) for r in rows) == [
        ("affinity", "live"),
        ("affinity", "sim"),
        ("holder-first", "sim"),
    ]
    (live,) = [dict(zip(HEADER, r, strict=True)) for r in rows if r[2] == "live"]
    # nothing beats the lower bound (rounded in the table)
    assert float(live["makespan"]) >= float(live["bound"]) * 0.99
    # Every task ran (the benchmark checks the pods' ids), none a second time...
    assert live["again"] == "0"
    # ...and both dispatcher processes completed a share of them.
    shares = [int(x) for x in live["shares"].split("/")]
    assert len(shares) == 2 and sum(shares) == 320 and min(shares) > 0
