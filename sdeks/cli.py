"""The `sdeks` command line.

    sdeks submit FILE [--wait] [--out DIR] [--timeout S] [--runtime NAME] [--new-id]
                      [--no-attribute]
    sdeks status ID [--json]
    sdeks tasks [--status S] [--limit N]
    sdeks wait ID [--out DIR] [--timeout S]
    sdeks cancel ID
    sdeks local up [--runtime NAME ...] [--port N] [--models DIR]
                   [--console-port N | --no-console]
    sdeks local down
    sdeks console [--host H] [--port N] [--stack NAME] [--runtime NAME ...] [--pods JSON]
                  [--read-only]
    sdeks models list [--bucket B]
    sdeks models make-tiny DIR [--family sd15|sdxl] [--single-file]
                          [--kind checkpoint|controlnet|detector|upscalers|faces|embedding|refiner]
    sdeks --version

Every command talks to whatever `AWS_ENDPOINT_URL` and the AWS credentials
point at: the embedded local stack or a real account. A setup mistake (no
credentials, the endpoint down or not AWS) is one line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sdeks.callback import Callback, TaskStatus

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_SETUP = 0, 1, 2, 3, 4
#: 128 + SIGINT, as shells report a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


class SetupError(Exception):
    """Something about the environment, not the task: said in one line (exit 4)."""


def _print(*parts: Any) -> None:
    print(*parts, flush=True)


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
    from sdeks.client import ClientError, SdeksClient, load_task_file, with_new_id

    client = SdeksClient()
    try:
        body, task = load_task_file(
            args.file, runtime=args.runtime, default_runtime=lambda: _only_runtime(client)
        )
    except ClientError as exc:
        _print(f"error: {exc}")
        return EXIT_USAGE
    if args.new_id:
        body, task = with_new_id(body, task)
    _warn_ignored_fields(task)

    # An id is single-use (docs/lifecycle.md): say what became of it instead of
    # publishing a message the dispatcher drops.
    table = _table()
    earlier = _existing(table, task.id)
    if earlier is not None:
        return _already_known(args, client, table, earlier)

    runtime = None if args.no_attribute else task.runtime
    if not args.wait:
        message_id = client.publish(body, runtime=runtime)
        _print(f"published {task.id} (runtime {task.runtime}, message {message_id})")
        return EXIT_OK

    from sdeks.progress import TaskProgress

    with client.listen([task.id]) as listener:
        message_id = client.publish(body, runtime=runtime)
        _print(f"published {task.id} (runtime {task.runtime}, message {message_id})")
        with TaskProgress(task.id, table, images=_image_count(task.content)) as progress:

            def on_event(callback: Callback | None) -> None:
                if callback is not None:
                    progress.status(callback.status.value)
                progress.refresh()

            try:
                results = listener.wait_terminal([task.id], args.timeout, on_event=on_event)
            except ClientError as exc:
                progress.refresh(force=True)
                _print(f"error: {exc}")
                return EXIT_TIMEOUT
            progress.refresh(force=True)
    return _report(client, results[task.id], Path(args.out))


def _report(client: Any, callback: Callback, out: Path) -> int:
    _print(describe_callback(callback))
    if callback.ignored_fields:
        _print(f"  ignored fields (not rendered): {', '.join(callback.ignored_fields)}")
    if callback.status is not TaskStatus.SUCCEEDED:
        return EXIT_FAILED
    for path in client.download(callback, out):
        _print(f"  {path}")
    return EXIT_OK


def _image_count(content: dict[str, Any]) -> int | None:
    from sdeks.bounds import count_of

    return count_of(content, {"batch_size": 1, "n_iter": 1})


def _only_runtime(client: Any) -> str | None:
    """The stack's runtime when it serves exactly one: legacy and serverless bodies
    carry none, and a newcomer's stack has one (`--runtime` picks otherwise)."""
    try:
        runtimes = client.runtimes()
    except Exception:  # a hint only: the file's own runtime, or the error below, decides
        return None
    return runtimes[0] if len(runtimes) == 1 else None


def _warn_ignored_fields(task: Any) -> None:
    try:
        from runtime.a1111 import ignored_fields
    except ImportError:  # an install without the runtime package: the pod reports them
        return
    ignored = ignored_fields(task.tasktype, task.content)
    if ignored:
        _print(
            f"warning: {task.tasktype.value} does not know {', '.join(map(repr, ignored))}: "
            "ignored, not rendered (a typo?)"
        )


def _existing(table: Any, task_id: str) -> Any:
    import asyncio

    from sdeks.errors import TaskTableError

    try:
        return asyncio.run(table.get(task_id))
    except TaskTableError as exc:  # no table (older stack): publish as before
        logging.getLogger(__name__).info("task table not readable: %s", exc)
        return None


def _already_known(args: argparse.Namespace, client: Any, table: Any, record: Any) -> int:
    """The id was published before: what became of it, and how to render again."""
    ended = record.status.terminal
    when = _when(record.finished_at if ended else record.received_at)
    _print(
        f"{record.id} was published before: {record.status.value} "
        f"({'finished' if ended else 'received'} {when}); not published again"
    )
    if record.output_location:
        _print(f"  outputs: {record.output_location}")
    if record.error:
        _print(f"  error: {record.error.code}: {record.error.message}")
    _print(
        "  ids are single-use; to render again: sdeks submit FILE --new-id "
        "(or change the id in the file)"
    )
    if not ended:
        if not args.wait:
            _print(f"  follow it with: sdeks wait {record.id}")
            return EXIT_OK
        return _wait_table(client, table, record.id, args.timeout, Path(args.out), 1.0)
    callback = record.terminal_callback()
    if not args.wait or callback is None:
        return EXIT_OK if record.status is TaskStatus.SUCCEEDED else EXIT_FAILED
    return _report(client, callback, Path(args.out))


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
    if record.republished:
        rows.append(
            (
                "republished",
                f"{record.republished} time(s) after it ended, last {_when(record.republished_at)}"
                ": dropped (ids are single-use; publish under a new id to render again)",
            )
        )
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
    from sdeks.client import SdeksClient

    if _bad_id(args.id):
        return EXIT_FAILED
    return _wait_table(
        SdeksClient(), _table(), args.id, args.timeout, Path(args.out), args.interval
    )


def _wait_table(
    client: Any, table: Any, task_id: str, timeout_s: float, out: Path, interval_s: float
) -> int:
    """Follow a task in the table with a progress bar until it ends, then report."""
    from sdeks.progress import TaskProgress

    deadline = time.monotonic() + timeout_s
    with TaskProgress(task_id, table, interval_s=0) as progress:
        while True:
            view = progress.refresh()
            if view is not None and view.record.status.terminal:
                break
            if view is None:
                progress.status("unknown (not received yet)")
            if time.monotonic() > deadline:
                _print(f"error: timed out after {timeout_s:.0f}s waiting for {task_id}")
                return EXIT_TIMEOUT
            time.sleep(interval_s)
    record = view.record
    callback = record.terminal_callback()
    if callback is None:
        _print(f"{task_id}: {record.status.value}")
        return EXIT_OK if record.status is TaskStatus.SUCCEEDED else EXIT_FAILED
    return _report(client, callback, out)


def cmd_cancel(args: argparse.Namespace) -> int:
    import asyncio

    from sdeks import aws
    from sdeks.client import SdeksClient
    from sdeks.lifecycle import Reporter
    from sdeks.tasks import CancelOutcome

    if _bad_id(args.id):
        return EXIT_FAILED
    client = SdeksClient()
    reporter = Reporter(
        aws.client("sns"),
        client.callback_topic_arn,
        table=_table(),
        # Signs the `cancelled` callback of a queued task where the CLI may publish it
        # (the local stack); deployed, the dispatcher publishes it (docs/lifecycle.md).
        signing_secret=os.environ.get("SDEKS_CALLBACK_SECRET") or None,
    )
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
    from sdeks.local import LocalStack, LocalStackError, StateFile, choose_port
    from sdeks.logs import configure_logging

    configure_logging("text", "INFO")
    workdir = Path(args.workdir)
    running = StateFile(workdir).read()
    if running is not None:
        raise SetupError(
            f"a local stack is already up (pid {running['pid']}, {running['endpoint']}): "
            "use it, or stop it with `sdeks local down`"
        )
    try:
        port, note = choose_port(args.port)
    except LocalStackError as exc:
        raise SetupError(str(exc)) from exc
    if note:
        _print(note)
    stack = LocalStack(
        workdir=workdir,
        runtimes=args.runtime or ["sdruntime"],
        moto_port=port,
        models_dir=Path(args.models) if args.models else None,
        example_inputs=True,
    )
    stopping = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
    except LocalStackError as exc:
        # `start` stopped whatever it had started: nothing is left behind.
        raise SetupError(f"the local stack did not start: {exc}") from exc
    state = StateFile(workdir)
    state.write(stack)
    console = None
    try:
        _print(stack.describe())
        if not args.no_console:
            from sdeks.console.app import serve_local

            try:
                console = serve_local(stack, port=args.console_port)
                _print(f"console         {console.url}")
            except OSError as exc:  # a busy port must not take the stack down with it
                _print(f"console         not started ({exc}); try --console-port")
        _print("\nthe stack is up; Ctrl-C (or `sdeks local down`) stops it")
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
        state.remove()
    return EXIT_OK


def cmd_local_down(args: argparse.Namespace) -> int:
    from sdeks.local import StateFile

    state = StateFile(Path(args.workdir))
    running = state.read()
    if running is None:
        _print(f"no local stack is up (nothing recorded in {state.path})")
        return EXIT_OK
    pid = int(running["pid"])
    _print(f"stopping the local stack (pid {pid}, {running['endpoint']}) ...")
    if not state.stop(timeout_s=args.timeout):
        _print(f"error: pid {pid} did not stop within {args.timeout:.0f}s")
        return EXIT_FAILED
    _print("stopped")
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


def cmd_models_list(args: argparse.Namespace) -> int:
    import os

    from sdeks import aws
    from sdeks.models import list_models
    from sdeks.names import StackNames

    bucket = (
        args.bucket
        or os.environ.get("SDEKS_MODELS_BUCKET")
        or StackNames(os.environ.get("SDEKS_STACK", "sdeks")).models_bucket
    )
    from sdeks.errors import ModelNotFoundError

    try:
        rows = list_models(aws.client("s3"), bucket)
    except ModelNotFoundError as exc:
        raise SetupError(
            f"cannot list s3://{bucket}: {exc.message} (--bucket or SDEKS_MODELS_BUCKET)"
        ) from exc
    if not rows:
        _print(f"no models in s3://{bucket}/ (checkpoints go under Stable-diffusion/)")
        return EXIT_OK
    _print(f"{'kind':<11} {'name (as tasks name it)':<40} {'size':>10}  key")
    for row in rows:
        _print(f"{row.kind:<11} {row.name:<40} {row.size_text:>10}  s3://{bucket}/{row.key}")
    return EXIT_OK


def cmd_models_make_tiny(args: argparse.Namespace) -> int:
    if args.kind in ("upscalers", "faces"):
        # DIR is the models bucket's root; files land in A1111's folders.
        from runtime import tiny_kinds

        build = {
            "upscalers": tiny_kinds.make_tiny_upscalers,
            "faces": tiny_kinds.make_tiny_face_models,
        }[args.kind]
        for written in build(Path(args.dir)):
            _print(f"wrote {written}")
        if args.kind == "faces" and not tiny_kinds.codeformer_available():
            _print(
                "no tiny CodeFormer: its architecture needs spandrel-extra-arches "
                '(non-commercial licence, docs/models.md): pip install "sdeks[restorer-codeformer]"'
            )
        _print(f"upload the contents of {args.dir} to the models bucket's root")
        return EXIT_OK
    from runtime.tiny import Family as TinyFamily
    from runtime.tiny import make_tiny

    if args.kind == "controlnet":
        from runtime.tiny_controlnet import make_tiny_controlnet

        path = make_tiny_controlnet(
            Path(args.dir), family=args.family, single_file=args.single_file
        )
        _print(
            f"wrote a tiny random {args.family} ControlNet to {path}: upload it under ControlNet/"
        )
        return EXIT_OK
    if args.kind == "detector":
        from runtime.detectors import save_tiny_detector

        dest = Path(args.dir)
        path = save_tiny_detector(dest if dest.suffix == ".pt2" else dest.with_suffix(".pt2"))
        _print(f"wrote a tiny red-region detector to {path}: upload it under adetailer/")
        return EXIT_OK
    if args.kind == "embedding":
        from runtime.tiny_embeddings import make_tiny_embedding

        path = make_tiny_embedding(Path(args.dir), family=args.family)
        _print(
            f"wrote a tiny random {args.family} embedding to {path}: upload it under embeddings/"
        )
        return EXIT_OK
    # An SD 1.x/2.x refiner is a checkpoint of the same family with other weights; an
    # SDXL refiner has the SDXL refiner's own architecture (`runtime.tiny`).
    seed = 1 if args.kind == "refiner" else 0
    family: TinyFamily = (
        "sdxl-refiner" if args.kind == "refiner" and args.family == "sdxl" else args.family
    )
    path = make_tiny(Path(args.dir), family=family, single_file=args.single_file, seed=seed)
    _print(f"wrote a tiny random {family} model to {path}")
    if args.single_file:
        from runtime.tiny import single_file_config_dir

        _print(
            f"its config folder is {single_file_config_dir(path)}: upload both under "
            "Stable-diffusion/ so the pod loads the file with no network"
        )
    else:
        _print(f"served as {path.name!r} (its folder's name) by `sdeks local up --models`")
    return EXIT_OK


# --- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from sdeks import __version__

    parser = argparse.ArgumentParser(prog="sdeks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sdeks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="publish a task envelope to the task topic")
    submit.add_argument("file", help="task JSON file ('-' for stdin)")
    submit.add_argument("--wait", action="store_true", help="wait for the terminal callback")
    submit.add_argument("--out", default="outputs", help="where --wait downloads PNGs")
    submit.add_argument("--timeout", type=float, default=600, help="seconds --wait waits")
    submit.add_argument(
        "--runtime",
        help="runtime for shapes that carry none (legacy, serverless); "
        "default: the stack's runtime when it serves only one",
    )
    submit.add_argument(
        "--new-id",
        action="store_true",
        help="publish under a fresh id (<id>-<6 hex>): ids are single-use",
    )
    submit.add_argument(
        "--no-attribute",
        action="store_true",
        help="publish without the `runtime` message attribute (served via the catch-all)",
    )
    submit.set_defaults(func=cmd_submit, uses_aws=True)

    status = sub.add_parser("status", help="status, progress, queue position, ETA of a task")
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="the whole record as JSON")
    status.add_argument("--workers", type=int, default=1, help="pods x slots, for the ETA")
    status.set_defaults(func=cmd_status, uses_aws=True)

    tasks = sub.add_parser("tasks", help="recent tasks")
    tasks.add_argument("--status", choices=[s.value for s in TaskStatus])
    tasks.add_argument("--limit", type=int, default=20)
    tasks.set_defaults(func=cmd_tasks, uses_aws=True)

    wait = sub.add_parser("wait", help="wait for a task with a progress bar, then download")
    wait.add_argument("id")
    wait.add_argument("--out", default="outputs")
    wait.add_argument("--timeout", type=float, default=600)
    wait.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    wait.set_defaults(func=cmd_wait, uses_aws=True)

    cancel = sub.add_parser("cancel", help="cancel a queued or running task")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel, uses_aws=True)

    local = sub.add_parser("local", help="the embedded local stack")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    up = local_sub.add_parser("up", help="start moto, the resources, a pod and the dispatcher")
    up.add_argument("--runtime", action="append", help="runtime name (repeatable)")
    up.add_argument(
        "--port",
        type=int,
        help="port of the embedded AWS endpoint (default 4566, or a free one if it is taken; "
        "0: any free port)",
    )
    up.add_argument("--workdir", default=".sdeks", help="model cache, logs")
    up.add_argument(
        "--models",
        help="a diffusers model folder, or an A1111 models folder, to serve instead of the "
        "tiny model (models are named after their files and folders)",
    )
    up.add_argument("--console-port", type=int, default=8765, help="port of the web console")
    up.add_argument("--no-console", action="store_true", help="do not start the web console")
    up.set_defaults(func=cmd_local_up)
    down = local_sub.add_parser("down", help="stop the stack `sdeks local up` started")
    down.add_argument("--workdir", default=".sdeks", help="as given to `local up`")
    down.add_argument("--timeout", type=float, default=60, help=argparse.SUPPRESS)
    down.set_defaults(func=cmd_local_down)

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
    listing = models_sub.add_parser("list", help="the models in the stack's models bucket")
    listing.add_argument(
        "--bucket", help="models bucket (default SDEKS_MODELS_BUCKET, sdeks-models)"
    )
    listing.set_defaults(func=cmd_models_list, uses_aws=True)
    tiny = models_sub.add_parser("make-tiny", help="write a tiny random SD model (tests, demo)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", choices=["sd15", "sd2", "sdxl"], default="sd15")
    tiny.add_argument("--single-file", action="store_true")
    tiny.add_argument(
        "--kind",
        choices=[
            "checkpoint",
            "controlnet",
            "detector",
            "upscalers",
            "faces",
            "embedding",
            "refiner",
        ],
        default="checkpoint",
        help="what to write: a checkpoint (Stable-diffusion/), a ControlNet (ControlNet/), "
        "an ADetailer detector (adetailer/), upscalers (ESRGAN, Compact, SwinIR) or faces "
        "(GFPGAN, CodeFormer when spandrel-extra-arches is installed, and a RetinaFace "
        "detector; for these two DIR is the bucket root), "
        "a textual-inversion embedding (embeddings/) or a refiner (Stable-diffusion/; with "
        "--family sdxl the SDXL refiner architecture, else a checkpoint with other weights)",
    )
    tiny.set_defaults(func=cmd_models_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "uses_aws", False):
            check_aws_setup()
        return int(args.func(args))
    except SetupError as exc:
        _print(f"error: {exc}")
        return EXIT_SETUP
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops `wait` or `submit --wait`: one line, not a traceback.
        # What was published stays published (`sdeks status ID` follows it).
        _print("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = setup_problem(exc)
        if message is None:
            raise
        _print(f"error: {message}")
        return EXIT_SETUP


def _endpoint() -> str | None:
    import os

    return os.environ.get("AWS_ENDPOINT_URL") or None


def check_aws_setup(connect_timeout_s: float = 2.0) -> None:
    """Fail fast, in one line, on the two mistakes every newcomer makes: no
    credentials (the `export` lines of `sdeks local up` not applied), and an
    endpoint nobody listens on (the stack is down): botocore would retry that
    for ~18 s and end in a traceback."""
    import socket
    from urllib.parse import urlsplit

    import boto3

    endpoint = _endpoint()
    if boto3.session.Session().get_credentials() is None:
        hint = (
            "run the `export` lines `sdeks local up` printed"
            if endpoint
            else "configure AWS credentials (aws configure, AWS_PROFILE), or for the local "
            "stack run the `export` lines `sdeks local up` printed"
        )
        raise SetupError(f"no AWS credentials: {hint}")
    if endpoint is None:
        return
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), connect_timeout_s).close()
    except OSError as exc:
        raise SetupError(
            f"nothing answers at AWS_ENDPOINT_URL={endpoint} ({exc.strerror or exc}): "
            "start the stack with `sdeks local up`, or unset AWS_ENDPOINT_URL for AWS"
        ) from exc


def setup_problem(exc: BaseException) -> str | None:
    """One line for an error that is about the environment, not the task; None otherwise."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
    )
    from botocore.parsers import ResponseParserError

    from sdeks.client import ClientError as SdeksClientError
    from sdeks.errors import TaskTableError

    endpoint = _endpoint() or "AWS"
    if isinstance(exc, TaskTableError) and isinstance(exc.__cause__, ClientError):
        exc = exc.__cause__
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials: run the `export` lines `sdeks local up` printed"
    if isinstance(exc, NoRegionError):
        return "no AWS region: set AWS_DEFAULT_REGION"
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return f"cannot reach {endpoint}: is the stack up (`sdeks local up`)?"
    not_aws = (
        f"{endpoint} does not answer like AWS: does another program hold that port? "
        "(`sdeks local up` prints the endpoint to export)"
    )
    if isinstance(exc, ResponseParserError):
        return not_aws
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", exc))
        if "<html" in message.lower() or "<!doctype" in message.lower():
            return not_aws
        if code in ("InvalidClientTokenId", "UnrecognizedClientException", "ExpiredToken"):
            return f"AWS refused the credentials ({code}): check them, or the `export` lines"
        return _one_line(f"AWS: {code}: {message}")
    if isinstance(exc, SdeksClientError | TaskTableError):
        return _one_line(str(exc))
    return None


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
