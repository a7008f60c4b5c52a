"""`python -m infra.app [--check]`: synthesize the sdeks stack into cdk.out.

`--check` adds cdk-nag's AwsSolutions checks: any unacknowledged finding fails
the synth (`make synth`). `cdk.json` runs this module, so `npx aws-cdk@2 deploy`
goes through the same code.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import cx_api
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from infra.config import ConfigError, load_config
from infra.stack import SdeksStack

ROOT = Path(__file__).resolve().parent.parent
#: The cdk-nag rule pack `--check` runs.
NAG_PACK = "AwsSolutions"


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
        app, stack = build_app(
            check="--check" in argv, outdir=os.environ.get("CDK_OUTDIR", str(ROOT / "cdk.out"))
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    assembly = app.synth()  # raises ValidationFailed on an unacknowledged cdk-nag finding
    print(synth_summary(stack, assembly, checked="--check" in argv, outdir=assembly.directory))
    return 0


def synth_summary(
    stack: SdeksStack, assembly: cx_api.CloudAssembly, *, checked: bool, outdir: str
) -> str:
    """What `make synth` prints on success: the stack, its resources by kind, and
    cdk-nag's outcome with the acknowledgements the code declares (each carries
    its reason next to the construct that needs it; see infra/nag.py)."""
    template = assembly.get_stack_by_name(stack.stack_name).template
    kinds = Counter(r["Type"] for r in template.get("Resources", {}).values())
    lines = [f"synthesized stack {stack.stack_name} into {outdir}: {sum(kinds.values())} resources"]
    lines += [f"  {count:>3} {kind}" for kind, count in sorted(kinds.items(), key=_by_count)]
    rules = acknowledged_rules(stack)
    nag = [rule for rule in rules if rule.startswith(NAG_PACK)]
    by_rule = Counter(rule.split("[", 1)[0] for rule in nag)
    shown = ", ".join(f"{rule} x{n}" for rule, n in sorted(by_rule.items(), key=_by_count))
    if checked:
        lines.append(
            f"cdk-nag {NAG_PACK}: no unacknowledged findings; {len(nag)} acknowledged"
            + (f" ({shown})" if shown else "")
        )
    else:
        lines.append("cdk-nag not run (--check runs it, as `make synth` does)")
    if len(rules) > len(nag):
        lines.append(f"other validation rules acknowledged: {len(rules) - len(nag)}")
    return "\n".join(lines)


def acknowledged_rules(scope: Construct) -> dict[str, str]:
    """Every finding acknowledged in the tree under `scope`, with its reason."""
    key = cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY
    rules: dict[str, str] = {}
    for construct in scope.node.find_all():
        for entry in construct.node.metadata:
            if entry.type == key and isinstance(entry.data, dict):
                # cdk-nag's findings are annotations: `Annotation::AwsSolutions-IAM5[...]`.
                rules.update(
                    {str(k).removeprefix("Annotation::"): str(v) for k, v in entry.data.items()}
                )
    return rules


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
