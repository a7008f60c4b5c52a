"""The chaos benchmark, small: SIGKILL pods and dispatchers under load, lose nothing.

`benchmarks/chaos.py` runs the full version (200 tasks, 12 kills); this one
runs 30 tasks and 4 kills (at least one pod and one dispatcher) on the same
code, so `make test` proves the property on every change.
"""

from __future__ import annotations

from benchmarks.chaos import ChaosConfig, run_chaos


def test_chaos_kills_lose_and_duplicate_nothing(tmp_path, tiny_models):
    # GIVEN two pods and two dispatchers, WHEN one of them is SIGKILLed every 3 s
    config = ChaosConfig(
        tasks=30,
        kills=4,
        interval_s=3.0,
        seed=8,
        # A late duplicate comes from a redelivery: within one visibility timeout (10 s).
        grace_s=12.0,
        models_dir=tiny_models,
        workdir=tmp_path,
    )
    report = run_chaos(config, say=lambda _: None)

    # THEN every task has exactly one terminal callback, and every success all its outputs
    detail = "\n".join([report.table(), *report.diagnosis])
    kinds = {k.kind for k in report.kills}
    assert len(report.kills) == 4 and kinds == {"pod", "dispatcher"}, detail
    assert report.lost == [], detail
    assert report.duplicates == 0, detail
    assert report.strangers == [], detail
    assert report.incomplete == {}, detail
    assert report.succeeded + report.failed == 30, detail
    assert report.succeeded > 0, detail
