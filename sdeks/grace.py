"""First call: a pod keeps itself for the replica whose job just ended (docs/dispatcher.md).

Several dispatcher replicas share the pods. A replica learns that its own job
ended the moment the pod answers it, and another replica only from its next
state poll; a poll landing in the short gap between two jobs shows the pod
free, and the other replica then either knocks too late (429) or wins and
switches the pod's model to one the first replica had not planned for. So
when a job ends, the pod holds first call for the replica that sent it
(`Job.replica`) for `grace_s`: during it the pod refuses a job of *another*
replica that would switch its model (429 with code `reserved`), and says so
in `GET/POST /v1/state` (`reserved`), so other replicas plan without it. A
job of the same model, of the holder, or without a replica id (an older
dispatcher) is admitted as before. `grace_s = 0` turns it off.

The dispatcher reads `reserved` as hostile (`Reserved.parse`): a bad value is
ignored, the hold it names is capped at `MAX_GRACE_S`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: Longest hold a pod may grant, and the most a dispatcher believes.
MAX_GRACE_S = 5.0
#: Replica ids: as in the demand report (`sdeks.demand`).
REPLICA_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
_REPLICA = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\Z")
_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".bin")
#: The code of the 429 a pod answers while it holds first call for another replica.
RESERVED = "reserved"


def same_model(a: str, b: str) -> bool:
    """A1111 names one checkpoint several ways: with or without extension or `[hash]`."""
    return _bare(a) == _bare(b)


def _bare(name: str) -> str:
    key = _HASH_SUFFIX.sub("", name.strip())
    for ext in _EXTENSIONS:
        if key.lower().endswith(ext):
            return key[: -len(ext)]
    return key


@dataclass(frozen=True)
class Reserved:
    """A pod's hold: `replica` has first call on it for `for_s` more seconds, and a
    job of `model` (its active model) switches nothing."""

    replica: str
    model: str
    for_s: float

    def to_json(self) -> dict[str, Any]:
        return {"replica": self.replica, "model": self.model, "for_s": round(self.for_s, 3)}

    @classmethod
    def parse(cls, doc: Any) -> Reserved | None:
        """From a pod's state; None when absent or not plausible."""
        if not isinstance(doc, Mapping):
            return None
        replica, model, for_s = doc.get("replica"), doc.get("model"), doc.get("for_s")
        if not isinstance(replica, str) or not _REPLICA.match(replica):
            return None
        if not isinstance(model, str) or len(model) > 256:
            return None
        if isinstance(for_s, bool) or not isinstance(for_s, int | float) or not for_s > 0:
            return None
        return cls(replica, model, min(float(for_s), MAX_GRACE_S))


class FirstCall:
    """One pod's hold for the replica whose job ended last (with slots > 1: the last
    one to end). Cleared by the holder's next job or when it expires."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = min(max(0.0, grace_s), MAX_GRACE_S)
        self._clock = clock
        self._held: tuple[str, str, float] | None = None

    def ended(self, replica: str | None, model: str) -> None:
        """A job of `replica` on `model` ended: hold the pod for it."""
        if self.grace_s > 0 and replica:
            self._held = (replica, model, self._clock() + self.grace_s)

    def current(self) -> Reserved | None:
        if self._held is None:
            return None
        replica, model, until = self._held
        left = until - self._clock()
        if left <= 0:
            self._held = None
            return None
        return Reserved(replica, model, left)

    def refuses(self, replica: str | None, model: str) -> Reserved | None:
        """The hold that refuses a job of `replica` on `model`, or None to admit it
        (the holder's job also ends the hold)."""
        held = self.current()
        if held is None or replica is None:
            return None
        if replica == held.replica:
            self._held = None
            return None
        if same_model(model, held.model):
            return None
        return held
