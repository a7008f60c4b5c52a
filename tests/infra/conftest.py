"""One synth per session (an EKS stack takes seconds and hundreds of MB to synthesize).

The session app runs cdk-nag's AwsSolutions checks, so the fixture itself fails if
any finding is unacknowledged. Image URIs are given, so no Docker image asset is
built (there is no Docker engine here); `test_images.py` covers the asset path.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from infra.config import DeployConfig

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

TEST_CONFIG: dict[str, Any] = {
    "prefix": "sdeks",
    "runtimes": [
        {"name": "sdruntime", "defaultModel": "v1-5-pruned-emaonly"},
        {
            "name": "sdxl",
            "defaultModel": "sd_xl_base_1.0",
            "dynamicModels": False,
            "instanceTypes": ["g6e.xlarge"],
            "minReplicas": 1,
            "maxReplicas": 3,
            "taskTimeLimitS": 900,
            "tasksPerReplica": 1,
        },
    ],
    "extraLinkBuckets": ["public-inputs"],
    "dispatcherImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdeks-dispatcher:test",
    "runtimeImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdeks-runtime:test",
}


#: The webhooks queue URL `render_plain` uses.
WEBHOOK_QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/sdeks-webhooks"


def render_plain(config: DeployConfig) -> list[dict[str, Any]]:
    """Every manifest the app renders, with plain strings where the stack has tokens."""
    from infra import collector, k8s, netpol
    from infra.workloads import render

    queue = "https://sqs.us-east-1.amazonaws.com/123456789012/sdeks-{}-tasks"
    workloads = render(
        config=config,
        dispatcher_image="registry.example/sdeks-dispatcher:1",
        runtime_image="registry.example/sdeks-runtime:1",
        common_env={
            "SDEKS_CALLBACK_TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:sdeks-callbacks",
            "SDEKS_OUTPUT_BUCKET": "sdeks-outputs-123456789012-us-east-1",
            "SDEKS_TASK_TABLE": "sdeks-tasks",
            "SDEKS_LOG_FORMAT": "json",
            "AWS_REGION": "us-east-1",
        },
        dispatcher_env={
            "SDEKS_QUEUES": json.dumps({r: queue.format(r) for r in config.runtime_names}),
            "SDEKS_CATCH_ALL_QUEUE_URL": queue.format("catch-all").replace("-tasks", ""),
            "SDEKS_S3_ALLOW_BUCKETS": json.dumps(["sdeks-models-123456789012-us-east-1"]),
        },
        queue_urls={r: queue.format(r) for r in config.runtime_names},
        webhook_queue_url=WEBHOOK_QUEUE_URL if config.webhooks else None,
        models_uri="s3://sdeks-models-123456789012-us-east-1",
        region="us-east-1",
    )
    nodes = [
        k8s.gpu_node_class(
            node_role="sdeks-karpenter-node",
            subnet_ids=["subnet-0a", "subnet-0b"],
            security_group_ids=["sg-0c"],
            tags={"sdeks.io/cluster": "sdeks"},
        ),
        k8s.gpu_node_pool(instance_types=config.gpu_instance_types, gpu_limit=8, drain_s=1200),
    ]
    observability = collector.manifests(
        namespace=config.namespace,
        image=config.collector_image,
        metrics_namespace="sdeks/sdeks",
        log_group="/sdeks/sdeks/metrics",
        region="us-east-1",
        internal_secret=config.internal_secret_name,
    )
    return workloads + nodes + observability + [netpol.runtime_policy(namespace=config.namespace)]


@dataclass
class Synth:
    stack: Any
    template: Any  # aws_cdk.assertions.Template
    raw: dict[str, Any]
    config: Any  # infra.config.DeployConfig

    def resources(self, type_: str) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.raw["Resources"].items() if r["Type"] == type_}

    def logical_id(self, type_: str, **props: Any) -> str:
        matches = [
            k
            for k, r in self.resources(type_).items()
            if all(r.get("Properties", {}).get(p) == v for p, v in props.items())
        ]
        assert len(matches) == 1, f"expected one {type_} with {props}, found {matches}"
        return matches[0]

    def manifests(self) -> list[dict[str, Any]]:
        """Every Kubernetes object the stack applies, CloudFormation references as markers."""
        out: list[dict[str, Any]] = []
        for r in self.resources("Custom::AWSCDK-EKS-KubernetesResource").values():
            out += json.loads(_flatten(r["Properties"]["Manifest"]))
        return out

    def manifest(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]


def _flatten(value: Any) -> str:
    """Render an Fn::Join'ed manifest string, writing `<<Ref:Id>>` / `<<Id.Attr>>` for tokens."""
    if isinstance(value, str):
        return value
    if "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return sep.join(_flatten(p) for p in parts)
    if "Ref" in value:
        return f"<<Ref:{value['Ref']}>>"
    if "Fn::GetAtt" in value:
        return f"<<{'.'.join(value['Fn::GetAtt'])}>>"
    raise AssertionError(f"unexpected intrinsic in a manifest: {value}")


def ref(logical_id: str) -> str:
    return f"<<Ref:{logical_id}>>"


def strip_markers(text: str) -> str:
    return re.sub(r"<<[^>]*>>", "x", text)


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    from aws_cdk.assertions import Template

    from infra.app import build_app

    outdir = tmp_path_factory.mktemp("cdk.out")
    app, stack = build_app(check=True, context={"sdeks": TEST_CONFIG}, outdir=str(outdir))
    assembly = app.synth()  # raises ValidationFailed on any unacknowledged cdk-nag finding
    raw = assembly.get_stack_by_name(stack.stack_name).template
    return Synth(stack=stack, template=Template.from_json(raw), raw=raw, config=stack.config)
