"""`python -m runtime --models s3://BUCKET[/PREFIX]|DIR --port N [--host H] [--device D]`.

Everything else comes from `SDEKS_*` variables (`runtime.settings`); AWS
endpoint and credentials from the standard AWS variables.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    parser.add_argument("--models", help="s3://BUCKET[/PREFIX] or a directory (SDEKS_MODELS)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(SDEKS_DEVICE)")
    parser.add_argument("--default-model", help="checkpoint when a task names none")
    parser.add_argument("--slots", type=int, help="jobs rendered at once (SDEKS_SLOTS)")
    args = parser.parse_args(argv)

    # Offline by construction: models come from the bucket or the image, never a hub.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(name, "1")

    from pydantic import ValidationError

    from runtime.settings import RuntimeSettings
    from sdeks.logs import configure_logging

    overrides = {
        key: value
        for key, value in {
            "models": args.models,
            "device": args.device,
            "default_model": args.default_model,
            "slots": args.slots,
        }.items()
        if value is not None
    }
    try:
        settings = RuntimeSettings(**overrides)
    except ValidationError as exc:
        print(f"invalid runtime settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    if not settings.models:
        print("--models (or SDEKS_MODELS) is required", file=sys.stderr)
        return 2

    import uvicorn

    from runtime.app import create_app

    app = create_app(settings)
    # uvicorn drains in-flight requests on SIGTERM before exiting (graceful shutdown).
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, timeout_graceful_shutdown=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
