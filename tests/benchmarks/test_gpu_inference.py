"""benchmarks/gpu_inference.py --quick: plain diffusers vs the runtime's path, tiny on CPU."""

from __future__ import annotations

import re


def test_gpu_inference_quick_ends_with_the_headline(benchmark):
    out = benchmark("gpu_inference.py", "--quick")

    assert re.fullmatch(
        r"runtime/plain images/s at batch 2: \d+\.\d\d \(runtime at \d+\.\d% of the FLOP floor, cpu\)",
        out.last,
    )
    assert out.number(r"at batch 2: (\d+\.\d+)") > 0
    paths = (
        "plain diffusers (fp32)",
        "runtime (float32)",
        "runtime tuned (float32, channels_last)",
    )
    for path in paths:
        rows = out.rows(path)
        assert [r[1] for r in rows] == ["1", "2"]  # batches
        for row in rows:
            seconds, per_s, vs_plain = float(row[2]), float(row[3]), float(row[4])
            assert seconds > 0 and abs(seconds * per_s - 1) < 0.05 and vs_plain > 0
