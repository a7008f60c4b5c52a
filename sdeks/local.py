"""The embedded local stack: the whole pipeline on one machine, no AWS account.

moto server (S3, SNS, SQS, DynamoDB) on 127.0.0.1, the same resources the CDK
app deploys (names from `sdeks.names`), a tiny random Stable Diffusion model
built offline and uploaded to the models bucket, one runtime pod per runtime
(uvicorn, CPU) and the dispatcher, each as a child process configured exactly
as in a cluster: through `SDEKS_*` variables.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdeks import aws
from sdeks.names import MODELS_CHECKPOINT_PREFIX, VISIBILITY_TIMEOUT_S, StackNames
from sdeks.resources import StackResources, create_stack_resources

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny-sd15"
LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "sdeks-local",
    "AWS_SECRET_ACCESS_KEY": "sdeks-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: Offline for good: nothing in the stack may reach a model hub.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1"}


class LocalStackError(Exception):
    pass


class ServiceExitedError(LocalStackError):
    """A service process exited while starting (it crashed, or was killed)."""


_ATOMIC_LOCK = threading.RLock()


def make_moto_dynamodb_atomic() -> None:
    """Make moto's conditional DynamoDB writes atomic per request, as DynamoDB's are.

    moto server handles each request on its own thread and checks a write's
    condition, then applies it, with no lock between: two racing conditional
    writes to one item can both succeed. The exactly-once terminal callback
    relies on DynamoDB's atomic conditional writes, so the embedded stack
    serializes moto's writes.

    Reads take the same lock: moto's UpdateItem of a new key first stores an
    item holding only the key, then applies the update expression to it, so a
    GetItem or Query served in between returned ``{"id": ...}`` alone, a state
    DynamoDB never shows. Idempotent; affects this process only.
    """
    from moto.dynamodb.models import DynamoDBBackend

    for name in (
        "put_item",
        "update_item",
        "delete_item",
        "transact_write_items",
        "get_item",
        "query",
        "scan",
    ):
        original = getattr(DynamoDBBackend, name)
        if getattr(original, "_sdeks_atomic", False):
            continue

        def locked(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with _ATOMIC_LOCK:
                return _original(self, *args, **kwargs)

        locked._sdeks_atomic = True  # type: ignore[attr-defined]
        setattr(DynamoDBBackend, name, locked)


def make_moto_sqs_deletes_atomic() -> None:
    """Make moto's DeleteMessage atomic per queue, as SQS's is.

    moto 5 deletes by rebuilding the queue's message list from a snapshot and
    assigning it, with no lock: two deletes served at once by its threads (the
    dispatcher deletes in concurrent batches) each put back the message the
    other removed, which then comes back after its visibility timeout and is
    delivered again. Each delete runs under the queue's own lock (the one
    SendMessage appends under). Idempotent; affects this process only.
    """
    from moto.sqs.models import Queue

    original = Queue.delete_message
    if getattr(original, "_sdeks_atomic", False):
        return

    def delete_message(self: Any, receipt_handle: str) -> None:
        with self._messages_lock:
            original(self, receipt_handle)

    delete_message._sdeks_atomic = True  # type: ignore[attr-defined]
    Queue.delete_message = delete_message  # type: ignore[method-assign]


def make_moto_faithful() -> None:
    """Every fix that makes moto server behave like AWS where the pipeline relies on it."""
    make_moto_dynamodb_atomic()
    make_moto_sqs_deletes_atomic()
    make_moto_sns_skip_deleted_queues()
    make_moto_sns_size_faithful()


def make_moto_sns_size_faithful() -> None:
    """Make SNS Publish count what AWS counts against its 256 KiB limit: the message and
    every attribute's name, type and value, in UTF-8 bytes.

    moto 5 compares only the message's length in characters, so a callback that
    AWS refuses (a multi-byte body, or attributes pushing it over) published fine
    locally and the bug showed only once deployed. Idempotent; this process only.
    """
    from moto.sns.exceptions import InvalidParameterValue
    from moto.sns.models import MAXIMUM_MESSAGE_LENGTH, SNSBackend

    original = SNSBackend.publish
    if getattr(original, "_sdeks_sized", False):
        return

    def publish(self: Any, message: str, *args: Any, **kwargs: Any) -> Any:
        attributes = kwargs.get("message_attributes")
        if attributes is None and len(args) >= 4:
            attributes = args[3]  # (arn, phone_number, subject, message_attributes, ...)
        size = len(message.encode("utf-8", "surrogatepass"))
        for name, attr in (attributes or {}).items():
            size += len(name.encode("utf-8"))
            if isinstance(attr, dict):
                size += len(str(attr.get("Type", attr.get("DataType", ""))).encode("utf-8"))
                size += len(str(attr.get("Value", attr.get("StringValue", ""))).encode("utf-8"))
        if size > MAXIMUM_MESSAGE_LENGTH:
            raise InvalidParameterValue(
                "An error occurred (InvalidParameter) when calling the Publish operation: "
                "Invalid parameter: Message too long"
            )
        return original(self, message, *args, **kwargs)

    publish._sdeks_sized = True  # type: ignore[attr-defined]
    SNSBackend.publish = publish  # type: ignore[method-assign]


def make_moto_sns_skip_deleted_queues() -> None:
    """Make SNS drop a delivery to a deleted SQS queue, as AWS does, instead of failing Publish.

    moto 5 sends each SQS subscription's copy inside Publish, so one listener
    that deleted its queue without unsubscribing made every later Publish to
    the topic fail with NonExistentQueue: the pods' and the dispatcher's
    callbacks were lost for every other subscriber. AWS keeps the publish and
    only that delivery fails. Idempotent; affects this process only.
    """
    from moto.sns.models import Subscription
    from moto.sqs.exceptions import QueueDoesNotExist

    original = Subscription.publish
    if getattr(original, "_sdeks_tolerant", False):
        return

    def publish(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except QueueDoesNotExist:
            log.debug("SNS delivery to deleted queue %s dropped", self.endpoint)
            return None

    publish._sdeks_tolerant = True  # type: ignore[attr-defined]
    Subscription.publish = publish  # type: ignore[method-assign]


#: The port `sdeks local up` prefers: LocalStack's, so tools configured for it work.
DEFAULT_PORT = 4566
#: Where the running `sdeks local up` records itself, for `sdeks local down`.
STATE_FILE = "local.json"
#: The key under the inputs bucket that examples/image-to-image.json links to.
EXAMPLE_INIT_IMAGE_KEY = "cat.png"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(requested: int | None) -> tuple[int, str | None]:
    """The embedded AWS's port (0: the system picks) and a note for the user, if any.

    Unasked, `DEFAULT_PORT`, or any free port when another program (LocalStack,
    another stack) holds it. Asked for a port that is taken: `LocalStackError`.
    """
    if requested is None:
        if port_is_free(DEFAULT_PORT):
            return DEFAULT_PORT, None
        return 0, f"port {DEFAULT_PORT} is taken (LocalStack?): using a free port instead"
    if requested and not port_is_free(requested):
        raise LocalStackError(
            f"port {requested} is taken by another program (LocalStack, another stack?): "
            "pick another --port, or --port 0 for any free one"
        )
    return requested, None


def init_image_png(size: int = 64) -> bytes:
    """A small synthetic picture (sky, sun, hill) to start image-to-image from."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (90, 140, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.6, size * 0.1, size * 0.9, size * 0.4), fill=(250, 220, 80))
    draw.pieslice((-size * 0.3, size * 0.55, size * 1.3, size * 1.6), 180, 360, fill=(60, 150, 70))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class StateFile:
    """`<workdir>/local.json`: the pid and endpoint of the running `sdeks local up`."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / STATE_FILE

    def write(self, stack: LocalStack) -> None:
        doc = {"pid": os.getpid(), "endpoint": stack.endpoint, "exports": stack.exports()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(doc, indent=2))

    def read(self) -> dict[str, Any] | None:
        """The record of a live `local up`; a stale one (its process gone) is removed."""
        try:
            doc = json.loads(self.path.read_text())
            pid = int(doc["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _alive(pid):
            self.remove()
            return None
        return dict(doc)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 60) -> bool:
        """SIGTERM the recorded `local up` (it stops its services and moto) and wait."""
        doc = self.read()
        if doc is None:
            return True
        pid = int(doc["pid"])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                self.remove()
                return True
            time.sleep(0.2)
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceExitedError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise LocalStackError(f"{url} did not answer 200 within {timeout_s:.0f}s")


def upload_folder(s3: Any, folder: Path, bucket: str, prefix: str) -> int:
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}{path.relative_to(folder).as_posix()}")
            count += 1
    return count


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path


@dataclass
class LocalStack:
    """Start with `start()` (or as a context manager), stop with `stop()`."""

    workdir: Path = field(default_factory=lambda: Path(".sdeks"))
    runtimes: list[str] = field(default_factory=lambda: ["sdruntime"])
    moto_port: int = 0
    pods_per_runtime: int = 1
    dispatchers: int = 1
    #: A diffusers folder (served under its folder's name) or an A1111 models folder
    #: (with `Stable-diffusion/`, or the checkpoints themselves) instead of the tiny model.
    models_dir: Path | None = None
    default_model: str = DEFAULT_MODEL
    #: Upload the images the examples link to (`s3://<inputs>/cat.png`), as `local up` does.
    example_inputs: bool = False
    #: More names under which the same tiny model is served (several "models" to route).
    model_aliases: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Extra variables for the dispatcher processes only.
    dispatcher_env_extra: dict[str, str] = field(default_factory=dict)
    visibility_timeout_s: int = VISIBILITY_TIMEOUT_S
    #: HMAC secret that signs webhook deliveries (receivers verify with it).
    webhook_secret: str = "sdeks-local-webhook-secret"
    #: The pod API token (pods require it, the dispatcher sends it), as in a deployment.
    pod_token: str = "sdeks-local-pod-token"
    #: Signs every callback (`sdeks.signing`); exported so subscribers can verify.
    callback_secret: str = "sdeks-local-callback-secret"
    #: The module run as a pod (`python -m <pod_module>`): tests swap in a fault-injecting wrapper.
    pod_module: str = "runtime"
    names: StackNames = field(default_factory=StackNames)

    endpoint: str = ""
    resources: StackResources | None = None
    pods: dict[str, list[Service]] = field(default_factory=dict)
    dispatcher_services: list[Service] = field(default_factory=list)
    _moto: Any = None

    @property
    def input_bucket(self) -> str:
        """A bucket for users' input images, allow-listed for `s3://` links."""
        return f"{self.names.prefix}-inputs"

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> LocalStack:
        """Start everything; on any failure, stop what was started and raise."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._moto = self._start_moto()
        try:
            self._start_rest()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_rest(self) -> None:
        clients = {s: self.client(s) for s in ("sns", "sqs", "s3", "dynamodb")}
        self.resources = create_stack_resources(
            **clients,
            runtimes=self.runtimes,
            names=self.names,
            visibility_timeout_s=self.visibility_timeout_s,
        )
        clients["s3"].create_bucket(Bucket=self.input_bucket)
        if self.example_inputs:
            clients["s3"].put_object(
                Bucket=self.input_bucket, Key=EXAMPLE_INIT_IMAGE_KEY, Body=init_image_png()
            )
        self._install_model(clients["s3"])
        for runtime in self.runtimes:
            # One at a time into the list: each pod's index (its name) counts those
            # before it, and `stop` reaches pods already started.
            self.pods[runtime] = []
            for _ in range(self.pods_per_runtime):
                self.pods[runtime].append(self.start_pod(runtime))
        for _ in range(self.dispatchers):
            self.dispatcher_services.append(self.start_dispatcher())

    def stop(self) -> None:
        services = self.dispatcher_services + [p for pods in self.pods.values() for p in pods]
        for service in services:
            if service.proc.poll() is None:
                service.proc.send_signal(signal.SIGTERM)
        for service in services:
            try:
                service.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
        self.dispatcher_services.clear()
        self.pods.clear()
        if self._moto is not None:
            self._moto.terminate()
            try:
                self._moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._moto.kill()
                self._moto.wait()
            self._moto = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- pieces --------------------------------------------------------------

    def _start_moto(self) -> subprocess.Popen[bytes]:
        """The embedded AWS in a process of its own (moto's state is per process).

        Up means its own ready line in its log, not merely something listening on
        the port: another program (LocalStack) may hold it.
        """
        port = self.moto_port
        log_path = self.workdir / "logs" / f"moto-{port or 'auto'}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = log_path.stat().st_size if log_path.exists() else 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdeks.moto_server", "--port", str(port)],
            env=self.service_env_base(),
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            text = log_path.read_bytes()[start:].decode(errors="replace")
            ready = re.search(r"^moto server on (http://\S+)$", text, re.MULTILINE)
            if ready:
                self.endpoint = ready.group(1)
                break
            if proc.poll() is not None:
                lines = text.strip().splitlines() or ["(no output)"]
                raise LocalStackError(f"embedded AWS exited with {proc.returncode}: {lines[-1]}")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise LocalStackError(f"embedded AWS did not start within 60s; see {log_path}")
            time.sleep(0.05)
        log.info("embedded AWS (moto) on %s", self.endpoint)
        return proc

    def service_env_base(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "AWS_PROFILE"}
        return env | LOCAL_CREDENTIALS | OFFLINE | {"PYTHONUNBUFFERED": "1"}

    def client(self, service: str) -> Any:
        """A boto3 client for the embedded AWS (its own fake credentials)."""
        credentials = {
            "aws_access_key_id": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }
        return aws.client(service, endpoint_url=self.endpoint, credentials=credentials)

    def _install_model(self, s3: Any) -> None:
        """Fill the models bucket. Models keep their own names (A1111's rule: a file or
        folder under `Stable-diffusion/` is named after itself), so `--models` with a
        folder `tiny-xl` serves `tiny-xl`."""
        assert self.resources
        bucket = self.resources.models_bucket
        source = self.models_dir
        if source is None:
            source = self.workdir / "models" / self.default_model
            if not (source / "model_index.json").exists():
                from runtime.tiny import make_tiny  # the runtime extra builds it

                log.info("building the tiny %s model in %s", self.default_model, source)
                make_tiny(source)
        elif not (source / "model_index.json").exists():
            # An A1111 models folder (`Stable-diffusion/`, `Lora/`...), or its checkpoints.
            prefix = (
                "" if (source / MODELS_CHECKPOINT_PREFIX).is_dir() else MODELS_CHECKPOINT_PREFIX
            )
            count = upload_folder(s3, source, bucket, prefix)
            log.info("uploaded %d files from %s to s3://%s/%s", count, source, bucket, prefix)
            # The pod's default is then its first checkpoint, as A1111's is.
            self.default_model = ""
            return
        else:
            self.default_model = source.name
        for name in [self.default_model, *self.model_aliases]:
            prefix = f"{MODELS_CHECKPOINT_PREFIX}{name}/"
            count = upload_folder(s3, source, bucket, prefix)
            log.info("uploaded %d files to s3://%s/%s", count, bucket, prefix)
        # Tiny upscalers, face restorer and detector in their A1111 folders, so extras,
        # hires upscalers and restore_faces work on the local stack too.
        kinds = self.workdir / "models" / "_other-kinds"
        if not kinds.exists():
            from runtime.tiny_kinds import make_tiny_face_models, make_tiny_upscalers

            make_tiny_upscalers(kinds)
            make_tiny_face_models(kinds)
        count = upload_folder(s3, kinds, bucket, "")
        log.info("uploaded %d upscaler/restorer files", count)

    def service_env(self) -> dict[str, str]:
        """Variables shared by every service process."""
        assert self.resources
        env = {
            **self.service_env_base(),
            "AWS_ENDPOINT_URL": self.endpoint,
            "SDEKS_CALLBACK_TOPIC_ARN": self.resources.callback_topic_arn,
            "SDEKS_OUTPUT_BUCKET": self.resources.output_bucket,
            "SDEKS_TASK_TABLE": self.resources.task_table,
            "SDEKS_POD_TOKEN": self.pod_token,
            "SDEKS_CALLBACK_SECRET": self.callback_secret,
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    def start_pod(
        self, runtime: str, *, port: int | None = None, index: int | None = None
    ) -> Service:
        assert self.resources
        port = port or free_port()
        index = len(self.pods.get(runtime, [])) if index is None else index
        log_path = self.workdir / "logs" / f"pod-{runtime}-{index}-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.service_env() | {
            # One torch thread per pod: a laptop runs several processes side by side,
            # and oversubscribed threads make tiny renders ~20x slower.
            "SDEKS_TORCH_THREADS": "1",
            "SDEKS_RUNTIME": runtime,
            "SDEKS_CACHE_DIR": str((self.workdir / "cache" / f"{runtime}-{port}").resolve()),
            # Distinct names in the task table's `pod` (they all share one hostname here).
            "SDEKS_POD_NAME": f"pod-{runtime}-{index}",
            # moto reads the whole object to serve each ranged GET: one GET per file.
            "SDEKS_S3_PART_MIB": "0",
        }
        if self.default_model:
            env["SDEKS_DEFAULT_MODEL"] = self.default_model
        models = f"s3://{self.resources.models_bucket}"
        cmd = [sys.executable, "-m", self.pod_module, "--models", models, "--port", str(port)]
        cmd += ["--host", "127.0.0.1", "--device", "cpu"]
        proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http_ok(f"{url}/health", timeout_s=180, proc=proc)
        except LocalStackError as exc:
            proc.kill()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise type(exc)(f"runtime pod did not start: {exc}\n{tail}") from exc
        log.info("runtime pod %s up on %s", runtime, url)
        return Service(f"pod-{runtime}-{index}", proc, url, log_path)

    def restart(self, service: Service) -> Service:
        """Start a stopped (or killed) service again on the same port, in place.

        Pods keep their URL, so statically configured dispatchers find them again.
        """
        if service.proc.poll() is None:
            raise LocalStackError(f"{service.name} is still running")
        port = int(service.url.rsplit(":", 1)[1])
        for runtime, pods in self.pods.items():
            if service in pods:
                index = pods.index(service)
                pods[index] = self.start_pod(runtime, port=port, index=index)
                return pods[index]
        index = self.dispatcher_services.index(service)
        self.dispatcher_services[index] = self.start_dispatcher(port=port, index=index)
        return self.dispatcher_services[index]

    def pod_urls(self) -> dict[str, list[str]]:
        return {rt: [p.url for p in pods] for rt, pods in self.pods.items()}

    def dispatcher_env(self) -> dict[str, str]:
        import json

        assert self.resources
        return self.service_env() | {
            "SDEKS_QUEUES": json.dumps(self.resources.queues),
            "SDEKS_CATCH_ALL_QUEUE_URL": self.resources.catch_all_queue_url,
            "SDEKS_DISCOVERY": "static",
            # Short polls: Ctrl-C waits for one in flight.
            "SDEKS_RECEIVE_WAIT_S": "1",
            "SDEKS_PODS": json.dumps(self.pod_urls()),
            # The local stack serves example images from 127.0.0.1; nothing else private.
            "SDEKS_LINK_ALLOW_NETS": json.dumps(["127.0.0.1/32"]),
            "SDEKS_S3_ALLOW_BUCKETS": json.dumps(
                [self.input_bucket, self.resources.output_bucket, self.resources.models_bucket]
            ),
            "SDEKS_WEBHOOK_QUEUE_URL": self.resources.webhook_queue_url,
            "SDEKS_WEBHOOK_SECRET": self.webhook_secret,
        }

    def start_dispatcher(self, *, port: int | None = None, index: int | None = None) -> Service:
        port = port or free_port()
        index = len(self.dispatcher_services) if index is None else index
        log_path = self.workdir / "logs" / f"dispatcher-{index}-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.dispatcher_env() | self.dispatcher_env_extra
        # Loopback, where the log below says it is (the cluster default is 0.0.0.0).
        env |= {"SDEKS_METRICS_HOST": "127.0.0.1", "SDEKS_METRICS_PORT": str(port)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher"],
            env=env,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http_ok(f"{url}/metrics", timeout_s=60, proc=proc)
        except LocalStackError as exc:
            proc.kill()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise type(exc)(f"dispatcher did not start: {exc}\n{tail}") from exc
        log.info("dispatcher up (metrics on %s)", url)
        return Service(f"dispatcher-{index}", proc, url, log_path)

    # --- what users need to talk to it ---------------------------------------

    def exports(self) -> dict[str, str]:
        assert self.resources
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            **LOCAL_CREDENTIALS,
            "SDEKS_TASK_TOPIC_ARN": self.resources.task_topic_arn,
            "SDEKS_CALLBACK_TOPIC_ARN": self.resources.callback_topic_arn,
            "SDEKS_OUTPUT_BUCKET": self.resources.output_bucket,
            "SDEKS_TASK_TABLE": self.resources.task_table,
            "SDEKS_MODELS_BUCKET": self.resources.models_bucket,
            "SDEKS_CALLBACK_SECRET": self.callback_secret,
        }

    def pod_headers(self) -> dict[str, str]:
        """What a direct call to a pod (`/v1/state`, `/metrics`, `/sdapi/...`) must send."""
        return {"Authorization": f"Bearer {self.pod_token}"}

    def describe(self) -> str:
        assert self.resources
        r = self.resources
        lines = [f"export {k}={v}" for k, v in self.exports().items()]
        lines += [
            "",
            f"task topic      {r.task_topic_arn}",
            f"callback topic  {r.callback_topic_arn}",
        ]
        for runtime, url in r.queues.items():
            lines.append(f"queue {runtime:<10}{url}  (DLQ {r.dlqs[runtime]})")
        lines += [
            f"catch-all queue {r.catch_all_queue_url}",
            f"output bucket   s3://{r.output_bucket}",
            f"models bucket   s3://{r.models_bucket}",
            f"inputs bucket   s3://{self.input_bucket}",
            f"task table      {r.task_table}",
        ]
        for runtime, urls in self.pod_urls().items():
            lines.append(f"pods {runtime:<11}{' '.join(urls)}")
        lines.append(f"logs            {(self.workdir / 'logs').resolve()}")
        return "\n".join(lines)
