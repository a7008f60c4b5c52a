"""Buckets: outputs (written by pods, read by users) and models (read by pods)."""

from __future__ import annotations

from typing import Any

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_s3 as s3
from constructs import Construct

from sdeks.names import StackNames


class Storage(Construct):
    """The output bucket, the models bucket (created or imported) and their access logs.

    Bucket names are the shared names plus account and region, because S3 names are
    global: `sdeks-outputs` alone would collide with every other deployment. Services
    get the real names from their settings, never by deriving them.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        names: StackNames,
        models_bucket_name: str | None,
        output_expiry_days: int,
        destroy_data_on_delete: bool,
    ) -> None:
        super().__init__(scope, id)
        removal = RemovalPolicy.DESTROY if destroy_data_on_delete else RemovalPolicy.RETAIN
        suffix = f"{Aws.ACCOUNT_ID}-{Aws.REGION}"
        common: dict[str, Any] = {
            "block_public_access": s3.BlockPublicAccess.BLOCK_ALL,
            "enforce_ssl": True,
            "object_ownership": s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            "removal_policy": removal,
            "auto_delete_objects": destroy_data_on_delete,
        }
        # Server access logs need SSE-S3 (log delivery cannot use a KMS key).
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            bucket_name=f"{names.prefix}-access-logs-{suffix}",
            encryption=s3.BucketEncryption.S3_MANAGED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(90))],
            **common,
        )
        # SSE-S3 rather than a customer key: users and pods read outputs with plain
        # s3:GetObject, and a presigned URL works without a KMS grant.
        self.output_bucket = s3.Bucket(
            self,
            "Outputs",
            bucket_name=f"{names.output_bucket}-{suffix}",
            encryption=s3.BucketEncryption.S3_MANAGED,
            versioned=False,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="outputs/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-outputs",
                    expiration=Duration.days(output_expiry_days) if output_expiry_days else None,
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                )
            ],
            **common,
        )
        self.models_bucket: s3.IBucket
        if models_bucket_name:
            self.models_bucket = s3.Bucket.from_bucket_name(self, "Models", models_bucket_name)
        else:
            self.models_bucket = s3.Bucket(
                self,
                "Models",
                bucket_name=f"{names.models_bucket}-{suffix}",
                encryption=s3.BucketEncryption.S3_MANAGED,
                versioned=True,
                server_access_logs_bucket=self.access_logs,
                server_access_logs_prefix="models/",
                lifecycle_rules=[s3.LifecycleRule(noncurrent_version_expiration=Duration.days(30))],
                **common,
            )
