"""The embedded AWS as its own process: ``python -m sdeks.moto_server --port N``.

moto keeps its state in process-wide backends, so two moto servers in one
process share every queue and bucket. The local stack runs each embedded AWS
in a child process of its own instead, with DynamoDB's conditional writes
made atomic (see `sdeks.local.make_moto_dynamodb_atomic`).
"""

from __future__ import annotations

import argparse
import signal
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    from moto.server import ThreadedMotoServer

    from sdeks.local import make_moto_faithful

    make_moto_faithful()
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"moto server on http://{args.host}:{args.port}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
