"""`python -m infra.app [--check]`: synthesize the sdeks stack into cdk.out.

`--check` adds cdk-nag's AwsSolutions checks: any unacknowledged finding fails
the synth (`make synth`). `cdk.json` runs this module, so `npx aws-cdk@2 deploy`
goes through the same code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from infra.config import ConfigError, load_config
from infra.stack import SdeksStack

ROOT = Path(__file__).resolve().parent.parent


def build_app(
    *, check: bool = False, context: dict[str, Any] | None = None, outdir: str | None = None
) -> tuple[cdk.App, SdeksStack]:
    # `python -m infra.app` (make synth, tests) reads cdk.json itself; under the CDK CLI
    # the CLI's context (cdk.json, -c) takes precedence over these values anyway.
    defaults = json.loads((ROOT / "cdk.json").read_text()).get("context", {})
    app = cdk.App(context={**defaults, **(context or {})}, outdir=outdir)
    config = load_config(app.node.try_get_context, base_dir=ROOT)
    env = cdk.Environment(
        account=os.environ.get("CDK_DEFAULT_ACCOUNT"), region=os.environ.get("CDK_DEFAULT_REGION")
    )
    stack = SdeksStack(app, config.prefix, config=config, env=env)
    if check:
        cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stack


def main(argv: list[str]) -> int:
    try:
        # Under the CDK CLI, CDK_OUTDIR decides; run directly, write ./cdk.out like the CLI.
        app, _ = build_app(
            check="--check" in argv, outdir=os.environ.get("CDK_OUTDIR", str(ROOT / "cdk.out"))
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    app.synth()  # raises ValidationFailed on an unacknowledged cdk-nag finding
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
