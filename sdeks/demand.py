"""Dispatcher replicas' waiting work, relayed through the pods (docs/dispatcher.md).

Each dispatcher replica holds its own share of a runtime's queue. On every
state poll it reports, per model, how many tasks it holds waiting
(`POST /v1/state` with a `DemandReport`); the pod keeps the last report of
each replica for `ttl_s` and answers with the sum of the *other* replicas'
reports, so every replica judges a model's backlog by all of it while it
assigns only its own tasks. No new AWS state: a replica that dies stops
reporting and its demand expires.

Both sides read the numbers as hostile: model names bounded in length and
number, counts non-negative ints, capped. The runtime refuses a bad report
with a 400 naming the field (`DemandError`); the dispatcher drops a bad
answer's entries instead (`parse_counts(strict=False)`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdeks.errors import InvalidParameterError

#: Models a report names at most (the rest go into `other`).
MAX_MODELS = 256
#: Characters of a model name at most (A1111 names with a hash fit).
MAX_NAME = 256
#: One count at most (more than any queue holds).
MAX_COUNT = 1_000_000
#: Replicas a pod remembers at most (the oldest report goes first).
MAX_REPLICAS = 64
#: How long a pod keeps a report by default, and at most.
DEFAULT_TTL_S = 10.0
MAX_TTL_S = 120.0
_REPLICA = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")


class DemandError(InvalidParameterError):
    """A demand report the pod refuses (the message names the field)."""


def _count(value: Any, where: str, *, strict: bool) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if strict:
            raise DemandError(f"{where}: must be an integer >= 0")
        return None
    return min(value, MAX_COUNT)


def parse_counts(value: Any, field: str = "demand", *, strict: bool = True) -> dict[str, int]:
    """`{model: count}` checked: at most `MAX_MODELS` names of at most `MAX_NAME`
    characters, counts ints >= 0 capped at `MAX_COUNT`; zero counts dropped.
    `strict=False` skips bad entries (and names past the limit) instead of raising."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        if strict:
            raise DemandError(f"{field}: must be an object of model name to count")
        return {}
    if strict and len(value) > MAX_MODELS:
        raise DemandError(f"{field}: at most {MAX_MODELS} models (put the rest in 'other')")
    out: dict[str, int] = {}
    for name, raw in value.items():
        if len(out) >= MAX_MODELS:
            break
        if not isinstance(name, str) or len(name) > MAX_NAME:  # "": the runtime's default
            if strict:
                raise DemandError(f"{field}: model names must be at most {MAX_NAME} characters")
            continue
        n = _count(raw, f"{field}.{name[:60]}", strict=strict)
        if n:
            out[name] = n
    return out


@dataclass(frozen=True)
class DemandReport:
    """What one replica holds waiting for one runtime."""

    replica: str
    demand: Mapping[str, int]
    #: Tasks of models beyond the `MAX_MODELS` named.
    other: int = 0
    ttl_s: float = DEFAULT_TTL_S

    @classmethod
    def of(cls, replica: str, counts: Mapping[str, int], ttl_s: float) -> DemandReport:
        """The largest `MAX_MODELS` counts named, the rest summed into `other`."""
        ranked = sorted(((n, m) for m, n in counts.items() if n > 0), key=lambda nm: -nm[0])
        named = {m: min(n, MAX_COUNT) for n, m in ranked[:MAX_MODELS] if len(m) <= MAX_NAME}
        other = sum(n for n, m in ranked if m not in named)
        return cls(replica, named, min(other, MAX_COUNT), ttl_s)

    @classmethod
    def parse(cls, doc: Any) -> DemandReport:
        """A report from the wire; raises `DemandError` naming the bad field."""
        if not isinstance(doc, Mapping):
            raise DemandError("body: must be a JSON object")
        replica = doc.get("replica")
        if not isinstance(replica, str) or not _REPLICA.match(replica):
            raise DemandError("replica: 1 to 64 characters of A-Z a-z 0-9 . _ : -")
        other = _count(doc.get("other", 0), "other", strict=True) or 0
        ttl = doc.get("ttl_s", DEFAULT_TTL_S)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S:
            raise DemandError(f"ttl_s: a number of seconds in (0, {MAX_TTL_S:g}]")
        return cls(replica, parse_counts(doc.get("demand"), "demand"), other, float(ttl))

    def to_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "demand": dict(self.demand),
            "other": self.other,
            "ttl_s": self.ttl_s,
        }


class DemandBoard:
    """A pod's last report per replica, each until it expires. Bounded: at most
    `MAX_REPLICAS` reports of at most `MAX_MODELS` counts each."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._reports: dict[str, tuple[float, DemandReport]] = {}

    def report(self, report: DemandReport) -> None:
        now = self._clock()
        self._expire(now)
        self._reports.pop(report.replica, None)  # re-inserted last: dicts keep order
        self._reports[report.replica] = (now + report.ttl_s, report)
        while len(self._reports) > MAX_REPLICAS:
            self._reports.pop(next(iter(self._reports)))

    def others(self, replica: str | None = None) -> tuple[dict[str, int], int]:
        """Sum of every unexpired report but `replica`'s: (per model, other)."""
        self._expire(self._clock())
        total: dict[str, int] = {}
        other = 0
        for name, (_, report) in self._reports.items():
            if name == replica:
                continue
            for model, n in report.demand.items():
                total[model] = min(MAX_COUNT, total.get(model, 0) + n)
            other = min(MAX_COUNT, other + report.other)
        if len(total) > MAX_MODELS:  # the answer names as many as a report may
            ranked = sorted(total.items(), key=lambda mn: -mn[1])
            total = dict(ranked[:MAX_MODELS])
            other = min(MAX_COUNT, other + sum(n for _, n in ranked[MAX_MODELS:]))
        return total, other

    def replicas(self) -> int:
        self._expire(self._clock())
        return len(self._reports)

    def _expire(self, now: float) -> None:
        for name in [n for n, (until, _) in self._reports.items() if until <= now]:
            del self._reports[name]
