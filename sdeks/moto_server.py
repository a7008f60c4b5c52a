"""The embedded AWS as its own process: ``python -m sdeks.moto_server --port N``.

moto keeps its state in process-wide backends, so two moto servers in one
process share every queue and bucket. The local stack runs each embedded AWS
in a child process of its own instead, with DynamoDB's conditional writes
made atomic (see `sdeks.local.make_moto_dynamodb_atomic`).

The socket is bound before anything else: a port another program holds ends
this process at once with exit code 3 and one line saying so (moto's own
`ThreadedMotoServer` would wait forever for a server thread that died).
Ready means the line `moto server on http://HOST:PORT` on stdout (with
``--port 0`` it names the port the system chose).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

EXIT_PORT_TAKEN = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from sdeks.local import make_moto_faithful

    make_moto_faithful()
    app = DomainDispatcherApplication(create_backend_app)
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except (OSError, SystemExit) as exc:  # werkzeug exits on "address in use"
        reason = exc.strerror if isinstance(exc, OSError) else "address in use"
        print(f"port {args.port} on {args.host} is taken: {reason}", file=sys.stderr)
        return EXIT_PORT_TAKEN
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"moto server on http://{args.host}:{server.server_port}", flush=True)
    stop.wait()
    server.shutdown()
    thread.join(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
