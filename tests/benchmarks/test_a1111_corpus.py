"""benchmarks/a1111_corpus.py --quick: real clients' bodies against a pod, none crash it."""

from __future__ import annotations

import re

from benchmarks.a1111_corpus import QUICK


def test_a1111_corpus_quick_renders_without_a_crash(benchmark):
    out = benchmark("a1111_corpus.py", "--quick", timeout=300)

    summary = re.fullmatch(
        r"rendered (\d+) of (\d+) \((\d+)%\), refused (\d+), crashed (\d+) in [\d.]+ s", out.last
    )
    assert summary, out.last
    rendered, total, _, refused, crashed = (int(g) for g in summary.groups())
    assert total == len(QUICK)
    assert crashed == 0
    assert rendered + refused == total
    assert rendered >= 0.9 * total  # the bar for the whole corpus

    rows = {name: out.rows(name) for name in QUICK}
    assert all(len(found) == 1 for found in rows.values()), rows
    for (row,) in rows.values():
        images, outcome = int(row[-3]), row[-1]
        assert not outcome.startswith("crash"), row
        if outcome == "rendered":
            assert images >= 1, row  # a render answers with its images
        else:
            assert re.match(r"refused [a-z_]+: ", outcome), row
    # The Telegram bot asks for batch_size 2 x n_iter 2: all four come back.
    assert int(rows["38_telegram_bot"][0][-3]) == 4
