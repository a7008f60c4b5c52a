"""The models bucket is created, or imported when the config names an existing one."""

from __future__ import annotations

import json

import aws_cdk as cdk
from aws_cdk.assertions import Match, Template

from infra.images import REPO_ROOT
from infra.storage import Storage
from sdeks.names import StackNames


def _template(**props: object) -> tuple[Template, Storage]:
    # The app's feature flags (S3 access logs via bucket policy, not ACLs) come from cdk.json.
    flags = json.loads((REPO_ROOT / "cdk.json").read_text())["context"]
    stack = cdk.Stack(cdk.App(context=flags), "Storage")
    storage = Storage(stack, "Storage", names=StackNames("t"), **props)  # type: ignore[arg-type]
    return Template.from_stack(stack), storage


def test_storage_imports_an_existing_models_bucket() -> None:
    template, storage = _template(
        models_bucket_name="team-models", output_expiry_days=0, destroy_data_on_delete=False
    )
    assert storage.models_bucket.bucket_name == "team-models"
    template.resource_count_is("AWS::S3::Bucket", 2)  # outputs + access logs only
    # outputExpiryDays 0 keeps outputs: no expiration rule, only multipart cleanup
    template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "LoggingConfiguration": {
                "LogFilePrefix": "outputs/",
                "DestinationBucketName": Match.any_value(),
            },
            "LifecycleConfiguration": {
                "Rules": [
                    Match.object_like(
                        {
                            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                            "ExpirationInDays": Match.absent(),
                        }
                    )
                ]
            },
        },
    )


def test_storage_destroy_on_delete_empties_buckets_first() -> None:
    template, _ = _template(
        models_bucket_name=None, output_expiry_days=7, destroy_data_on_delete=True
    )
    template.resource_count_is("AWS::S3::Bucket", 3)
    template.has_resource("AWS::S3::Bucket", {"DeletionPolicy": "Delete"})
    template.resource_count_is("Custom::S3AutoDeleteObjects", 3)
