"""The `sdeks` command line.

    sdeks submit FILE [--wait] [--out DIR] [--timeout S] [--no-attribute]
    sdeks local up [--runtime NAME ...] [--port N]
    sdeks models make-tiny DIR [--family sd15|sdxl] [--single-file]

Every command talks to whatever `AWS_ENDPOINT_URL` and the AWS credentials
point at: the embedded local stack or a real account.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sdeks.callback import Callback

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3


def _print(*parts: Any) -> None:
    print(*parts, flush=True)


class Spinner:
    """A one-line progress indicator on a terminal, silent elsewhere."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.frames = itertools.cycle("|/-\\")
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def tick(self, status: str = "waiting") -> None:
        if self.tty:
            elapsed = time.monotonic() - self.started
            sys.stderr.write(f"\r{next(self.frames)} {self.label}: {status} {elapsed:5.1f}s ")
            sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * (len(self.label) + 40) + "\r")
            sys.stderr.flush()


def describe_callback(callback: Callback) -> str:
    if callback.status.value == "succeeded":
        return (
            f"{callback.id}: succeeded, {len(callback.image_url)} image(s) at "
            f"{callback.output_location} in {callback.timings.total_ms / 1000:.1f}s"
        )
    error = callback.error
    reason = f"{error.code}: {error.message}" if error else "no error given"
    return f"{callback.id}: {callback.status.value} ({reason})"


# --- submit ------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from sdeks.client import ClientError, SdeksClient, load_task_file

    try:
        body, task = load_task_file(args.file, runtime=args.runtime)
    except ClientError as exc:
        _print(f"error: {exc}")
        return EXIT_USAGE
    client = SdeksClient()
    runtime = None if args.no_attribute else task.runtime
    if not args.wait:
        message_id = client.publish(body, runtime=runtime)
        _print(f"published {task.id} (runtime {task.runtime}, message {message_id})")
        return EXIT_OK

    with client.listen([task.id]) as listener:
        message_id = client.publish(body, runtime=runtime)
        _print(f"published {task.id} (runtime {task.runtime}, message {message_id})")
        spinner = Spinner(task.id)
        status = {"now": "queued"}

        def on_event(callback: Callback | None) -> None:
            if callback is not None:
                status["now"] = callback.status.value
            spinner.tick(status["now"])

        try:
            results = listener.wait_terminal([task.id], args.timeout, on_event=on_event)
        except ClientError as exc:
            spinner.done()
            _print(f"error: {exc}")
            return EXIT_TIMEOUT
        spinner.done()
    callback = results[task.id]
    _print(describe_callback(callback))
    if callback.status.value != "succeeded":
        return EXIT_FAILED
    for path in client.download(callback, Path(args.out)):
        _print(f"  {path}")
    return EXIT_OK


# --- local stack ---------------------------------------------------------------


def cmd_local_up(args: argparse.Namespace) -> int:
    from sdeks.local import LocalStack
    from sdeks.logs import configure_logging

    configure_logging("text", "INFO")
    stack = LocalStack(
        workdir=Path(args.workdir),
        runtimes=args.runtime or ["sdruntime"],
        moto_port=args.port,
        models_dir=Path(args.models) if args.models else None,
    )
    stopping = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack.start()
    try:
        _print(stack.describe())
        _print("\nthe stack is up; Ctrl-C stops it")
        while not stopping["flag"]:
            time.sleep(0.2)
            for service in stack.dispatcher_services + [
                p for pods in stack.pods.values() for p in pods
            ]:
                if service.proc.poll() is not None:
                    _print(
                        f"{service.name} exited ({service.proc.returncode}); see {service.log_path}"
                    )
                    return EXIT_FAILED
    finally:
        _print("stopping the stack ...")
        stack.stop()
    return EXIT_OK


# --- models --------------------------------------------------------------------


def cmd_models_make_tiny(args: argparse.Namespace) -> int:
    from runtime.tiny import make_tiny

    path = make_tiny(Path(args.dir), family=args.family, single_file=args.single_file)
    _print(f"wrote a tiny random {args.family} model to {path}")
    return EXIT_OK


# --- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdeks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="publish a task envelope to the task topic")
    submit.add_argument("file", help="task JSON file ('-' for stdin)")
    submit.add_argument("--wait", action="store_true", help="wait for the terminal callback")
    submit.add_argument("--out", default="outputs", help="where --wait downloads PNGs")
    submit.add_argument("--timeout", type=float, default=600, help="seconds --wait waits")
    submit.add_argument("--runtime", help="runtime for shapes that carry none (legacy, serverless)")
    submit.add_argument(
        "--no-attribute",
        action="store_true",
        help="publish without the `runtime` message attribute (served via the catch-all)",
    )
    submit.set_defaults(func=cmd_submit)

    local = sub.add_parser("local", help="the embedded local stack")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    up = local_sub.add_parser("up", help="start moto, the resources, a pod and the dispatcher")
    up.add_argument("--runtime", action="append", help="runtime name (repeatable)")
    up.add_argument("--port", type=int, default=4566, help="port of the embedded AWS endpoint")
    up.add_argument("--workdir", default=".sdeks", help="model cache, logs")
    up.add_argument("--models", help="a diffusers model folder to serve instead of the tiny one")
    up.set_defaults(func=cmd_local_up)

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    tiny = models_sub.add_parser("make-tiny", help="write a tiny random SD model (tests, demo)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    tiny.add_argument("--single-file", action="store_true")
    tiny.set_defaults(func=cmd_models_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
