"""benchmarks/model_switch.py --quick: ModelStore activation per tier vs raw ceilings."""

from __future__ import annotations

import re


def test_model_switch_quick_ends_with_the_headline(benchmark):
    out = benchmark("model_switch.py", "--quick")

    assert re.fullmatch(
        r"worst tier/ceiling: \d+\.\d\d \((gpu|disk|s3|s3-ranged), \d+ MiB\)", out.last
    )
    assert out.number(r"worst tier/ceiling: (\d+\.\d+)") > 0
    for tier in ("gpu", "ram", "disk", "s3", "s3-ranged"):
        (row,) = out.rows(tier)
        assert float(row[1]) > 0  # the store's activation, ms
    # Only the bucket tiers download; the disk and bucket tiers load into RAM.
    assert float(out.rows("s3")[0][5]) > 0
    assert float(out.rows("s3-ranged")[0][5]) > 0
    assert float(out.rows("disk")[0][5]) == 0
    assert float(out.rows("disk")[0][6]) > 0
