"""Every manifest the app renders, validated offline against the cluster version's schemas."""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
import pytest

from infra import k8s
from infra.config import DeployConfig
from tests.infra.conftest import TEST_CONFIG, Synth, render_plain, strip_markers

#: Custom resources: kubernetes-validate ships only the built-in schemas, so these are
#: checked against the fields their controllers require (KEDA 2.x, Karpenter v1 APIs).
CUSTOM_KINDS: dict[tuple[str, str], list[str]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ["spec.scaleTargetRef.name", "spec.triggers"],
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ["spec.podIdentity.provider"],
    ("karpenter.sh/v1", "NodePool"): [
        "spec.template.spec.nodeClassRef.name",
        "spec.template.spec.requirements",
    ],
    ("karpenter.k8s.aws/v1", "EC2NodeClass"): [
        "spec.role",
        "spec.amiSelectorTerms",
        "spec.subnetSelectorTerms",
        "spec.securityGroupSelectorTerms",
    ],
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _validate(manifest: dict[str, Any], version: str) -> None:
    key = (manifest["apiVersion"], manifest["kind"])
    assert DNS_LABEL.match(manifest["metadata"]["name"]), manifest["metadata"]["name"]
    if key in CUSTOM_KINDS:
        for path in CUSTOM_KINDS[key]:
            value: Any = manifest
            for part in path.split("."):
                assert isinstance(value, dict) and part in value, f"{key[1]} lacks {path}"
                value = value[part]
            assert value not in (None, "", [], {}), f"{key[1]} has an empty {path}"
        return
    kubernetes_validate.validate(manifest, f"{version}.0", strict=True)


CONFIG = DeployConfig.model_validate(TEST_CONFIG)


@pytest.mark.parametrize(
    "manifest", render_plain(CONFIG), ids=lambda m: f"{m['kind']}-{m['metadata']['name']}"
)
def test_rendered_manifest_is_valid_for_the_cluster_version(manifest: dict[str, Any]) -> None:
    _validate(manifest, CONFIG.kubernetes_version)


def test_manifests_applied_by_the_stack_are_valid(synth: Synth) -> None:
    # The stack's own manifests, with CloudFormation references replaced by a placeholder.
    manifests = synth.manifests()
    kinds = {m["kind"] for m in manifests}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "ScaledObject",
        "NodePool",
        "EC2NodeClass",
    } <= kinds
    for manifest in manifests:
        _validate(json.loads(strip_markers(json.dumps(manifest))), synth.config.kubernetes_version)


def test_invalid_manifest_is_rejected_by_the_validator() -> None:
    # GIVEN a Service with a field Kubernetes does not know THEN validation fails (the check bites)
    service = k8s.runtime_service(namespace="sdeks", runtime="sdruntime")
    service["spec"]["clusterIp"] = "None"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, f"{CONFIG.kubernetes_version}.0", strict=True)


def test_dispatcher_rbac_only_reads_endpoint_slices() -> None:
    role, binding = k8s.dispatcher_rbac(namespace="sdeks", service_account="sdeks-dispatcher")
    assert role["kind"] == "Role"  # namespaced, not a ClusterRole
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert binding["subjects"][0]["name"] == "sdeks-dispatcher"


def test_grace_period_covers_prestop_a_whole_task_and_upload() -> None:
    assert k8s.grace_period_s(600) == k8s.PRESTOP_SLEEP_S + 600 + k8s.DRAIN_MARGIN_S


def test_dispatcher_reads_secrets_through_secret_key_refs() -> None:
    deployment = k8s.dispatcher_deployment(
        namespace="sdeks",
        image="img",
        env={"SDEKS_A": "1"},
        secret_env={"SDEKS_WEBHOOK_SECRET": ("sdeks-webhook", "secret")},
        replicas=1,
        service_account="sdeks-dispatcher",
        termination_grace_s=100,
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "SDEKS_A", "value": "1"},
        {
            "name": "SDEKS_WEBHOOK_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "sdeks-webhook", "key": "secret"}},
        },
    ]
    _validate(deployment, CONFIG.kubernetes_version)
    # A variable given both ways is a mistake, not a precedence question.
    with pytest.raises(ValueError, match=r"\['SDEKS_A'\] given both"):
        k8s.dispatcher_deployment(
            namespace="sdeks",
            image="img",
            env={"SDEKS_A": "1"},
            secret_env={"SDEKS_A": ("s", "k")},
            replicas=1,
            service_account="sdeks-dispatcher",
            termination_grace_s=100,
        )


def test_runtime_pods_follow_the_restricted_pod_security_profile() -> None:
    deployment = k8s.runtime_deployment(
        namespace="sdeks",
        runtime="sdruntime",
        image="img",
        env={},
        models_uri="s3://models",
        instance_types=["g6.xlarge"],
        service_account="sdeks-runtime",
        task_time_limit_s=600,
        cpu="3",
        memory="12Gi",
    )
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
