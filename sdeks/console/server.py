"""The console's HTTP server: the static page and a small JSON API, on the stdlib.

    GET  /                              the page (static/index.html)
    GET  /static/<file>                 its script and style sheet
    GET  /api/info                      stack, runtimes, statuses, read-only flag
    GET  /api/tasks?status=&runtime=&limit=
    GET  /api/tasks/<id>
    GET  /api/fleet
    GET  /api/models
    POST /api/tasks                     the submit form (JSON) -> publishes one task
    POST /api/tasks/<id>/cancel

`http.server` with one thread per request keeps the console free of any
dependency beyond the base install. The page has no login: it acts with the
credentials of whoever started it, so it binds to 127.0.0.1 by default and
answers only requests whose ``Host`` is one it serves (no DNS rebinding);
the two POSTs also need a JSON body and a same-origin ``Origin``, which a
foreign web page cannot send without the browser's CORS preflight, which
this server never grants.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sdeks.console.backend import Console, ConsoleError
from sdeks.console.forms import FormError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
#: Images come from presigned S3 URLs (another origin); nothing else leaves 'self'.
CSP = (
    "default-src 'self'; img-src 'self' http: https:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_TASK = re.compile(r"^/api/tasks/([^/]+)$")
_CANCEL = re.compile(r"^/api/tasks/([^/]+)/cancel$")


def static_file(name: str) -> bytes:
    """A file of the page, from the package data (`sdeks/console/static/`)."""
    return resources.files("sdeks.console").joinpath("static", name).read_bytes()


class ConsoleServer:
    """Serve `console` on `host:port` (0: any free port) in a background thread."""

    def __init__(
        self,
        console: Console,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_hosts: list[str] | None = None,
    ) -> None:
        self.console = console
        handler = type("Handler", (_Handler,), {"console": console, "server_ref": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        names = {host, "127.0.0.1", "localhost", "[::1]", *(allowed_hosts or [])}
        self.allowed_hosts = {f"{n}:{self.port}" for n in names} | set(allowed_hosts or [])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> ConsoleServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="sdeks-console", daemon=True
        )
        self._thread.start()
        log.info("console on %s", self.url)
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.console.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    console: Console
    server_ref: ConsoleServer
    server_version = "sdeks-console"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- dispatch ---------------------------------------------------------------

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        path = url.path
        try:
            if path in ("/", "/index.html"):
                self._send_static("index.html")
            elif path.startswith("/static/"):
                name = path.removeprefix("/static/")
                if name not in STATIC_FILES:
                    raise ConsoleError("not_found", f"no such file {name!r:.80}", status=404)
                self._send_static(name)
            elif path == "/api/info":
                self._send_json(self.console.info())
            elif path == "/api/tasks":
                query = parse_qs(url.query)
                self._send_json(
                    {
                        "tasks": self.console.tasks(
                            status=_one(query, "status"),
                            runtime=_one(query, "runtime"),
                            limit=_limit(_one(query, "limit")),
                        )
                    }
                )
            elif path == "/api/fleet":
                self._send_json(self.console.fleet())
            elif path == "/api/models":
                self._send_json({"models": self.console.models()})
            elif match := _TASK.match(path):
                self._send_json(self.console.task(unquote(match.group(1))))
            else:
                raise ConsoleError("not_found", f"no such page {path!r:.80}", status=404)
        except Exception as exc:  # every failure answers with a code, never a dropped socket
            self._send_error(exc)

    def do_POST(self) -> None:
        if not self._host_ok() or not self._same_origin():
            return
        path = urlsplit(self.path).path
        try:
            body = self._json_body()
            if path == "/api/tasks":
                self._send_json(self.console.submit(body), status=HTTPStatus.ACCEPTED)
            elif match := _CANCEL.match(path):
                self._send_json(self.console.cancel(unquote(match.group(1))))
            else:
                raise ConsoleError("not_found", f"no such action {path!r:.80}", status=404)
        except Exception as exc:
            self._send_error(exc)

    # --- guards -------------------------------------------------------------------

    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        if host in self.server_ref.allowed_hosts:
            return True
        self._send_json(
            {"error": {"code": "bad_host", "message": f"this console does not serve {host!r:.80}"}},
            status=HTTPStatus.MISDIRECTED_REQUEST,
        )
        return False

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is None or origin == f"http://{self.headers.get('Host', '')}":
            return True
        self._send_json(
            {"error": {"code": "bad_origin", "message": "cross-origin requests are refused"}},
            status=HTTPStatus.FORBIDDEN,
        )
        return False

    def _json_body(self) -> Any:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ConsoleError("bad_request", "the body must be application/json", status=415)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ConsoleError("bad_request", "bad Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise ConsoleError("bad_request", f"the body must be at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ConsoleError("bad_request", f"the body is not JSON: {exc}") from None

    # --- answers --------------------------------------------------------------------

    def _send_static(self, name: str) -> None:
        self._send(HTTPStatus.OK, static_file(name), STATIC_FILES[name])

    def _send_json(self, payload: Any, *, status: int = HTTPStatus.OK) -> None:
        data = json.dumps(payload, separators=(",", ":"), default=str).encode()
        self._send(status, data, "application/json")

    def _send_error(self, exc: Exception) -> None:
        if isinstance(exc, ConsoleError):
            self._send_json({"error": exc.to_error()}, status=exc.status)
        elif isinstance(exc, FormError):
            self._send_json({"error": exc.to_error()}, status=HTTPStatus.BAD_REQUEST)
        else:
            log.exception("console request %s failed", self.path)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
            self._send_json({"error": error}, status=HTTPStatus.INTERNAL_SERVER_ERROR)

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(data)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _limit(value: str | None) -> int:
    if not value:
        return 50
    try:
        return int(value)
    except ValueError:
        raise ConsoleError(
            "invalid_limit", f"limit must be a whole number, got {value!r:.20}"
        ) from None
