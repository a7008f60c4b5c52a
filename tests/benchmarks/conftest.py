"""Run a benchmark's quick mode as its own process, the way a person would.

These tests keep the benchmarks from rotting: they check that each one runs
end to end, prints its table and ends with its headline, and that the numbers
are sane (finite, positive, consistent). They never assert timings: the
figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Output:
    lines: list[str]

    @property
    def last(self) -> str:
        return self.lines[-1]

    def number(self, pattern: str) -> float:
        """The first number captured by `pattern` in any line."""
        for line in self.lines:
            match = re.search(pattern, line)
            if match:
                return float(match.group(1))
        raise AssertionError(f"no line matches {pattern!r}:\n" + "\n".join(self.lines[-30:]))

    def rows(self, first_cell: str) -> list[list[str]]:
        """Table rows (cells split on 2+ spaces) whose first cell is `first_cell`."""
        out = []
        for line in self.lines:
            cells = re.split(r"\s{2,}", line.strip())
            if cells and cells[0] == first_cell:
                out.append(cells)
        return out


def run_benchmark(script: str, *args: str, timeout: float = 240) -> Output:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("AWS_ENDPOINT_URL", None)  # the benchmarks start their own moto server
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"{script} printed nothing; stderr:\n{done.stderr[-3000:]}"
    return Output(lines)


@pytest.fixture
def benchmark():
    return run_benchmark
