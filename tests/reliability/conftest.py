"""Reliability fixtures: one tiny model for every stack, the loopback-only sandbox for
service processes, and the hostile-input stack (real pods with a poison fault injected)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeks.local import LocalStack, Service, ServiceExitedError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: A prompt containing this kills the pod that renders it (tests/reliability/crashpod.py).
POISON = "POISON-PILL"
#: A model alias no test renders with: it must never reach a pod's device tier.
UNUSED_MODEL = "never-rendered"
VISIBILITY_S = 10


def sandbox_env() -> dict[str, str]:
    """Variables that keep a service process on loopback (tests/reliability/sandbox)."""
    path = os.pathsep.join([str(HERE / "sandbox"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path.rstrip(os.pathsep), "SDEKS_TEST_LOOPBACK_ONLY": "1"}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The tiny SD 1.5 model folder, built once for every stack of the session."""
    from runtime.tiny import make_tiny

    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd15"
    make_tiny(folder)
    return folder


class Supervisor(threading.Thread):
    """Restarts pods that died, as Kubernetes restarts a crashed container (each pod in
    its own thread: a restart takes seconds and pods die independently)."""

    def __init__(self, stack: LocalStack) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.stack = stack
        self.restarts: list[str] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            for pods in list(self.stack.pods.values()):
                for pod in list(pods):
                    with self._lock:
                        if pod.proc.poll() is None or pod.name in self._busy:
                            continue
                        self._busy.add(pod.name)
                    threading.Thread(target=self._restart, args=(pod,), daemon=True).start()

    def _restart(self, pod: Service) -> None:
        try:
            if not self.stopping.is_set():
                self.stack.restart(pod)
                self.restarts.append(pod.name)
        except ServiceExitedError:
            # It died again while starting (a poison job can reach a pod that is
            # already serving before its health check answered): another crash, as
            # Kubernetes counts it; the next pass restarts it again.
            self.restarts.append(f"{pod.name} (died starting)")
        except BaseException as exc:  # reported by the tests
            self.errors.append(exc)
        finally:
            with self._lock:
                self._busy.discard(pod.name)

    def wait_idle(self, timeout_s: float = 60) -> None:
        """Until no restart is in progress (before the stack stops)."""
        deadline = time.monotonic() + timeout_s
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="package")
def hostile(tmp_path_factory, tiny_models) -> Iterator[LocalStack]:
    """One pipeline for the hostile-input and poison tests.

    Two real pods run through `crashpod` (a poison prompt kills them; a
    supervisor restarts them), one dispatcher; service processes are
    sandboxed to loopback. A pod failure is retried on the next receive
    straight away (one pod attempt per receive, no backoff) so that the
    poison task reaches maxReceiveCount in seconds; links time out after 3 s
    and are capped at 1 MiB so the slow-drip and oversize cases stay short.
    """
    workdir = tmp_path_factory.mktemp("hostile")
    stack = LocalStack(
        workdir=workdir,
        pods_per_runtime=2,
        models_dir=tiny_models,
        model_aliases=[UNUSED_MODEL],
        visibility_timeout_s=VISIBILITY_S,
        pod_module="tests.reliability.crashpod",
        extra_env={
            **sandbox_env(),
            "SDEKS_TEST_POISON": POISON,
            "SDEKS_TEST_CRASH_LOG": str(workdir / "crashes.log"),
            "SDEKS_TORCH_THREADS": "1",
        },
        dispatcher_env_extra={
            "SDEKS_LEASE_EXTENSION_S": str(VISIBILITY_S),
            "SDEKS_HEARTBEAT_INTERVAL_S": "3",
            "SDEKS_RECEIVE_WAIT_S": "2",
            "SDEKS_STATE_INTERVAL_S": "0.5",
            "SDEKS_POD_ATTEMPTS": "1",
            "SDEKS_RETRY_BACKOFF_S": "0",
            "SDEKS_LINK_TIMEOUT_S": "3",
            "SDEKS_LINK_MAX_BYTES": str(1024 * 1024),
            "SDEKS_GRACE_PERIOD_S": "2",
        },
    )
    stack.start()
    supervisor = Supervisor(stack)
    supervisor.start()
    stack.supervisor = supervisor  # type: ignore[attr-defined]
    yield stack
    supervisor.stopping.set()
    supervisor.join(timeout=30)
    supervisor.wait_idle()
    stack.stop()
