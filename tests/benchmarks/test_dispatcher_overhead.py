"""benchmarks/dispatcher_overhead.py --quick: one dispatcher vs a plain SQS loop on moto."""

from __future__ import annotations

import re


def test_dispatcher_overhead_quick_ends_with_the_headline(benchmark):
    out = benchmark("dispatcher_overhead.py", "--quick")

    headline = re.fullmatch(
        r"dispatcher/ceiling throughput: (\d+\.\d\d) \((\d+) vs (\d+) tasks/s\)", out.last
    )
    assert headline, out.last
    ratio, rate, ceiling = (float(x) for x in headline.groups())
    assert ratio > 0 and rate > 0 and ceiling > 0
    assert abs(ratio - rate / ceiling) <= 0.01 + 1 / ceiling  # rounded in the line
    # The throughput, where-the-time-goes and latency tables each have the four consumers.
    for consumer in ("dispatcher, no task table", "dispatcher + task table (local stack)"):
        assert len(out.rows(consumer)) == 3
    # Per task, the plain loop makes one receive and one delete call per 10 messages.
    plain = out.rows("plain receive+delete loop (ceiling)")[1]
    assert float(plain[5]) == 0.1 and float(plain[6]) == 0.1
