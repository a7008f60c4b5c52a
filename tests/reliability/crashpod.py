"""``python -m tests.reliability.crashpod ARGS``: the real runtime pod with one fault injected.

No real input crashes the real pod: every failure inside a render is caught
and becomes a failed callback (`runtime.jobs.run_job`). A poison task that
kills its pod every time (a segfaulting kernel, the OOM killer) therefore
needs a fault injected: a task whose prompt contains ``SDEKS_TEST_POISON``
SIGKILLs the pod process after the pod marked the task running, i.e.
mid-render. Everything else is ``python -m runtime`` unchanged, so the other
tasks are rendered by the real pod.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def install_poison(marker: str) -> None:
    import runtime.jobs as jobs

    real_run_job = jobs.run_job

    def run_job(job: Any, **kwargs: Any) -> Any:
        if marker in str(job.task.content.get("prompt", "")):
            crashes = os.environ.get("SDEKS_TEST_CRASH_LOG")
            if crashes:  # one line per crash, for the test to count
                with open(crashes, "a") as log:
                    log.write(f"{job.task.id} {os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_run_job(job, **kwargs)

    # runtime.app imports run_job from runtime.jobs at call time, so this takes effect.
    jobs.run_job = run_job


def main() -> int:
    marker = os.environ.get("SDEKS_TEST_POISON")
    if marker:
        install_poison(marker)
    from runtime.__main__ import main as runtime_main

    return runtime_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
