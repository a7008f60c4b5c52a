"""The `sdeks` command line.

    sdeks submit FILE [--wait] [--out DIR] [--timeout S] [--no-attribute]
    sdeks status ID [--json]
    sdeks tasks [--status S] [--limit N]
    sdeks wait ID [--out DIR] [--timeout S]
    sdeks cancel ID
    sdeks local up [--runtime NAME ...] [--port N] [--console-port N | --no-console]
    sdeks console [--host H] [--port N] [--stack NAME] [--runtime NAME ...] [--pods JSON]
                  [--read-only]
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

from sdeks.callback import Callback, TaskStatus

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
    if callback.status is TaskStatus.SUCCEEDED:
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
    if callback.status is not TaskStatus.SUCCEEDED:
        return EXIT_FAILED
    for path in client.download(callback, Path(args.out)):
        _print(f"  {path}")
    return EXIT_OK


# --- lifecycle: status, tasks, wait, cancel -------------------------------------


def _table() -> Any:
    import os

    from sdeks import aws
    from sdeks.names import StackNames
    from sdeks.tasks import TaskTable

    name = (
        os.environ.get("SDEKS_TASK_TABLE")
        or StackNames(os.environ.get("SDEKS_STACK", "sdeks")).task_table
    )
    return TaskTable(aws.client("dynamodb"), name)


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value / 1000:.1f}s"


def _when(epoch_ms: int | None) -> str:
    if epoch_ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch_ms / 1000)) + "Z"


def _bad_id(task_id: str) -> bool:
    """Print one line and return True when `task_id` cannot name a task (the table
    would refuse it with a traceback: an empty key is a DynamoDB validation error)."""
    from sdeks.envelope import check_task_id

    try:
        check_task_id(task_id)
    except ValueError as exc:
        _print(f"error: {'no task id given' if not task_id else exc}")
        return True
    return False


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from sdeks.lifecycle import describe

    if _bad_id(args.id):
        return EXIT_FAILED
    view = asyncio.run(describe(_table(), args.id, workers=args.workers))
    if view is None:
        _print(f"no task {args.id!r} (unknown, or expired from the table)")
        return EXIT_FAILED
    record = view.record
    if args.json:
        _print(view.model_dump_json(indent=2))
        return EXIT_OK
    rows = [
        ("id", record.id),
        (
            "status",
            record.status.value + (" (cancel requested)" if record.cancel_requested else ""),
        ),
        ("runtime / model", f"{record.runtime or '-'} / {record.model or '-'}"),
        ("attempts", str(record.attempts)),
        ("received", _when(record.received_at)),
        ("started", _when(record.started_at)),
        ("finished", _when(record.finished_at)),
    ]
    if record.progress_total:
        rows.append(("progress", f"{record.progress_done or 0}/{record.progress_total} steps"))
    if view.queue_position is not None:
        rows.append(("queue position", str(view.queue_position + 1)))
    if view.eta_s is not None and not record.status.terminal:
        rows.append(("eta", f"~{view.eta_s:.0f}s"))
    rows.append(("queued / execution", f"{_ms(record.queued_ms)} / {_ms(record.execution_ms)}"))
    if record.output_location:
        rows.append(("output", record.output_location))
    for url in record.image_url:
        rows.append(("image", url))
    if record.error:
        rows.append(("error", f"{record.error.code}: {record.error.message}"))
    if record.webhook_status:
        rows.append(
            ("webhook", f"{record.webhook_status} after {record.webhook_attempts} attempt(s)")
        )
    for label, value in rows:
        _print(f"{label:<20}{value}")
    return EXIT_OK


def cmd_tasks(args: argparse.Namespace) -> int:
    import asyncio

    from sdeks.callback import TaskStatus

    status = TaskStatus(args.status) if args.status else None
    records = asyncio.run(_table().list_recent(status, limit=args.limit))
    _print(f"{'id':<32} {'status':<10} {'runtime':<12} {'received':<21} {'images':>6}")
    for r in records:
        _print(
            f"{r.id:<32} {r.status.value:<10} {(r.runtime or '-'):<12} "
            f"{_when(r.received_at):<21} {len(r.image_url):>6}"
        )
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    import asyncio

    from sdeks.client import SdeksClient

    if _bad_id(args.id):
        return EXIT_FAILED
    table = _table()
    spinner = Spinner(args.id)
    deadline = time.monotonic() + args.timeout
    while True:
        record = asyncio.run(table.get(args.id))
        if record is not None and record.status.terminal:
            break
        if time.monotonic() > deadline:
            spinner.done()
            _print(f"error: timed out after {args.timeout:.0f}s waiting for {args.id}")
            return EXIT_TIMEOUT
        if record is None:
            spinner.tick("unknown")
        elif record.progress_total:
            spinner.tick(
                f"{record.status.value} {record.progress_done or 0}/{record.progress_total}"
            )
        else:
            spinner.tick(record.status.value)
        time.sleep(args.interval)
    spinner.done()
    callback = record.terminal_callback()
    if callback is None:
        _print(f"{args.id}: {record.status.value}")
        return EXIT_OK if record.status is TaskStatus.SUCCEEDED else EXIT_FAILED
    _print(describe_callback(callback))
    if callback.status is not TaskStatus.SUCCEEDED:
        return EXIT_FAILED
    for path in SdeksClient().download(callback, Path(args.out)):
        _print(f"  {path}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    import asyncio

    from sdeks import aws
    from sdeks.client import SdeksClient
    from sdeks.lifecycle import Reporter
    from sdeks.tasks import CancelOutcome

    if _bad_id(args.id):
        return EXIT_FAILED
    client = SdeksClient()
    reporter = Reporter(aws.client("sns"), client.callback_topic_arn, table=_table())
    outcome = asyncio.run(reporter.cancel(args.id))
    messages = {
        CancelOutcome.CANCELLED: "cancelled (it was still queued)",
        CancelOutcome.CANCEL_REQUESTED: "cancel requested: the pod stops it between steps",
        CancelOutcome.ALREADY_FINISHED: "already finished; nothing to cancel",
        CancelOutcome.NOT_FOUND: "no such task",
    }
    _print(f"{args.id}: {messages[outcome]}")
    ok = outcome in (CancelOutcome.CANCELLED, CancelOutcome.CANCEL_REQUESTED)
    return EXIT_OK if ok else EXIT_FAILED


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
    console = None
    try:
        _print(stack.describe())
        if not args.no_console:
            from sdeks.console.app import serve_local

            console = serve_local(stack, port=args.console_port)
            _print(f"console         {console.url}")
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
        if console is not None:
            console.stop()
        stack.stop()
    return EXIT_OK


# --- console -------------------------------------------------------------------


def cmd_console(args: argparse.Namespace) -> int:
    from sdeks.console.app import config_from_env
    from sdeks.console.backend import Console
    from sdeks.console.server import ConsoleServer

    try:
        config = config_from_env(
            stack=args.stack, pods=args.pods, runtimes=args.runtime, read_only=args.read_only
        )
    except ValueError as exc:
        _print(f"error: {exc}")
        return EXIT_USAGE
    server = ConsoleServer(Console(config), host=args.host, port=args.port)
    _print(f"console on {server.url} (stack {config.names.prefix}); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return EXIT_OK


# --- models --------------------------------------------------------------------


def cmd_models_make_tiny(args: argparse.Namespace) -> int:
    from runtime.tiny import make_tiny

    path = make_tiny(Path(args.dir), family=args.family, single_file=args.single_file)
    _print(f"wrote a tiny random {args.family} model to {path}")
    if args.single_file:
        from runtime.tiny import single_file_config_dir

        _print(
            f"its config folder is {single_file_config_dir(path)}: upload both under "
            "Stable-diffusion/ so the pod loads the file with no network"
        )
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

    status = sub.add_parser("status", help="status, progress, queue position, ETA of a task")
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="the whole record as JSON")
    status.add_argument("--workers", type=int, default=1, help="pods x slots, for the ETA")
    status.set_defaults(func=cmd_status)

    tasks = sub.add_parser("tasks", help="recent tasks")
    tasks.add_argument("--status", choices=[s.value for s in TaskStatus])
    tasks.add_argument("--limit", type=int, default=20)
    tasks.set_defaults(func=cmd_tasks)

    wait = sub.add_parser("wait", help="wait for a task with a progress bar, then download")
    wait.add_argument("id")
    wait.add_argument("--out", default="outputs")
    wait.add_argument("--timeout", type=float, default=600)
    wait.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    wait.set_defaults(func=cmd_wait)

    cancel = sub.add_parser("cancel", help="cancel a queued or running task")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel)

    local = sub.add_parser("local", help="the embedded local stack")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    up = local_sub.add_parser("up", help="start moto, the resources, a pod and the dispatcher")
    up.add_argument("--runtime", action="append", help="runtime name (repeatable)")
    up.add_argument("--port", type=int, default=4566, help="port of the embedded AWS endpoint")
    up.add_argument("--workdir", default=".sdeks", help="model cache, logs")
    up.add_argument("--models", help="a diffusers model folder to serve instead of the tiny one")
    up.add_argument("--console-port", type=int, default=8765, help="port of the web console")
    up.add_argument("--no-console", action="store_true", help="do not start the web console")
    up.set_defaults(func=cmd_local_up)

    console = sub.add_parser("console", help="a web page: tasks, fleet, submit, cancel")
    console.add_argument(
        "--host", default="127.0.0.1", help="address to bind (no login: keep local)"
    )
    console.add_argument("--port", type=int, default=8765)
    console.add_argument("--stack", help="stack prefix (default $SDEKS_STACK or sdeks)")
    console.add_argument(
        "--runtime", action="append", help="runtime to show (repeatable; default: all found)"
    )
    console.add_argument("--pods", help='pods to show: {"runtime": ["http://host:port"]} JSON')
    console.add_argument("--read-only", action="store_true", help="no submit form, no cancel")
    console.set_defaults(func=cmd_console)

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    tiny = models_sub.add_parser("make-tiny", help="write a tiny random SD model (tests, demo)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", choices=["sd15", "sd2", "sdxl"], default="sd15")
    tiny.add_argument("--single-file", action="store_true")
    tiny.set_defaults(func=cmd_models_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
