"""`make synth`'s summary: the stack, its resources by kind, cdk-nag's outcome."""

from __future__ import annotations

from collections import Counter

import aws_cdk as cdk

from infra.app import acknowledged_rules, synth_summary


def test_synth_summary_names_the_stack_its_resources_and_nag(synth):
    assembly = cdk.Stage.of(synth.stack).synth()  # the cached assembly of the fixture
    text = synth_summary(synth.stack, assembly, checked=True, outdir="cdk.out")
    lines = text.splitlines()

    kinds = Counter(r["Type"] for r in synth.raw["Resources"].values())
    assert lines[0] == (
        f"synthesized stack {synth.stack.stack_name} into cdk.out: {sum(kinds.values())} resources"
    )
    assert f"  {kinds['AWS::SQS::Queue']:>3} AWS::SQS::Queue" in lines
    nag = [r for r in acknowledged_rules(synth.stack) if r.startswith("AwsSolutions-")]
    assert nag, "the stack acknowledges cdk-nag findings (infra/nag.py)"
    [nag_line] = [line for line in lines if line.startswith("cdk-nag")]
    assert f"no unacknowledged findings; {len(nag)} acknowledged (AwsSolutions-" in nag_line


def test_synth_summary_without_check_says_nag_did_not_run(synth):
    assembly = cdk.Stage.of(synth.stack).synth()
    text = synth_summary(synth.stack, assembly, checked=False, outdir="out")
    assert "cdk-nag not run" in text
