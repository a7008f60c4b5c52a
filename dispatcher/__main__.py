"""`python -m dispatcher`: read settings, configure logging, run until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys


def main() -> int:
    from pydantic import ValidationError

    from dispatcher.settings import DispatcherSettings
    from sdeks.logs import configure_logging

    try:
        settings = DispatcherSettings()  # type: ignore[call-arg]  # from SDEKS_* variables
    except ValidationError as exc:
        print(f"dispatcher: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(_run(settings))
    return 0


async def _run(settings: object) -> None:
    from dispatcher.app import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
