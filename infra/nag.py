"""Helpers to acknowledge cdk-nag findings precisely, next to the code that causes them.

cdk-nag 3 reports a finding as `RuleId[FindingId]` and fails the synth unless the
construct (or a parent) acknowledges it. We acknowledge the exact finding where
possible — `AwsSolutions-IAM5[Resource::<OutputsBucket.Arn>/*]`, not every IAM5 —
so a new wildcard elsewhere in the same policy still fails `make synth`.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_s3 as s3
from constructs import IConstruct


def acknowledge(scope: IConstruct, reason: str, *finding_ids: str) -> None:
    cdk.Validations.of(scope).acknowledge(
        *(cdk.Acknowledgment(id=finding, reason=reason) for finding in finding_ids)
    )


def managed_policy(name: str) -> str:
    """IAM4 finding for an AWS managed policy attached to a role (`service-role/...` included)."""
    return f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{name}]"


def bucket_objects(bucket: s3.IBucket, suffix: str = "*") -> list[str]:
    """IAM5 findings for `<bucket>/<suffix>` in both spellings CDK renders an object ARN in."""
    child = bucket.node.default_child
    if isinstance(child, cdk.CfnElement):
        logical = cdk.Stack.of(bucket).get_logical_id(child)
        resolved = cdk.Stack.of(bucket).resolve(logical)
        return [
            f"AwsSolutions-IAM5[Resource::<{resolved}.Arn>/{suffix}]",
            f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::<{resolved}>/{suffix}]",
        ]
    # An imported bucket: its name is a literal string.
    return [f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::{bucket.bucket_name}/{suffix}]"]


def literal_bucket_objects(name: str) -> str:
    return f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::{name}/*]"
