"""The sdeks workloads on the cluster: the dispatcher and one GPU pool per runtime."""

from __future__ import annotations

import json

from aws_cdk import Aws
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra import k8s
from infra.cluster import Cluster
from infra.config import RUNTIME_PROCESS_MEMORY, DeployConfig

DISPATCHER_SERVICE_ACCOUNT = "sdeks-dispatcher"
RUNTIME_SERVICE_ACCOUNT = "sdeks-runtime"


class Workloads(Construct):
    """Namespace, service accounts (Pod Identity roles as attributes), Deployments, Services,
    PodDisruptionBudgets and KEDA ScaledObjects.

    `common_env`, `dispatcher_env`, `queue_urls` and `webhook_queue_url` carry
    CloudFormation tokens; the manifests are rendered by `infra.k8s` and applied through
    the kubectl provider.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        cluster: Cluster,
        config: DeployConfig,
        dispatcher_image: str,
        runtime_image: str,
        common_env: dict[str, str],
        dispatcher_env: dict[str, str],
        queue_urls: dict[str, str],
        webhook_queue_url: str | None,
        models_uri: str,
    ) -> None:
        super().__init__(scope, id)
        ns = config.namespace
        self.dispatcher_role: iam.Role = cluster.pod_identity_role(
            self, "DispatcherRole", namespace=ns, service_account=DISPATCHER_SERVICE_ACCOUNT
        )
        self.runtime_role: iam.Role = cluster.pod_identity_role(
            self, "RuntimeRole", namespace=ns, service_account=RUNTIME_SERVICE_ACCOUNT
        )
        self.manifests: list[dict] = render(
            config=config,
            dispatcher_image=dispatcher_image,
            runtime_image=runtime_image,
            common_env=common_env,
            dispatcher_env=dispatcher_env,
            queue_urls=queue_urls,
            webhook_queue_url=webhook_queue_url,
            models_uri=models_uri,
            region=Aws.REGION,
        )
        namespace, *rest = self.manifests
        self.namespace: eks.KubernetesManifest = cluster.cluster.add_manifest(
            "SdeksNamespace", namespace
        )
        self.objects: eks.KubernetesManifest = cluster.cluster.add_manifest("SdeksWorkloads", *rest)
        self.objects.node.add_dependency(self.namespace)


def render(
    *,
    config: DeployConfig,
    dispatcher_image: str,
    runtime_image: str,
    common_env: dict[str, str],
    dispatcher_env: dict[str, str],
    queue_urls: dict[str, str],
    webhook_queue_url: str | None,
    models_uri: str,
    region: str,
) -> list[dict]:
    """Every workload manifest, namespace first. Pure: tests call it with plain strings.

    `webhook_queue_url` is the webhooks queue when `config.webhooks` is on, else None.
    """
    ns = config.namespace
    longest_task_s = max(r.task_time_limit_s for r in config.runtimes)
    # A forwarded job may take the longest runtime's whole time limit, and on SIGTERM
    # the dispatcher waits that long for running jobs.
    drain_s = longest_task_s + k8s.DRAIN_MARGIN_S
    services = {r.name: k8s.runtime_workload_name(r.name) for r in config.runtimes}
    if (webhook_queue_url is not None) != config.webhooks:
        raise ValueError(
            f"webhook_queue_url must be given exactly when webhooks are on "
            f"(webhooks={config.webhooks}, webhook_queue_url={webhook_queue_url!r})"
        )
    webhook_env: dict[str, str] = {}
    # The pod API token (pods require it, the dispatcher sends it) and the callback
    # signing secret, from the Secret the operator creates (docs/deploy.md).
    internal = config.internal_secret_name
    internal_secrets = {
        "SDEKS_POD_TOKEN": (internal, k8s.POD_TOKEN_KEY),
        "SDEKS_CALLBACK_SECRET": (internal, k8s.CALLBACK_SECRET_KEY),
    }
    webhook_secret: dict[str, tuple[str, str]] = dict(internal_secrets)
    if webhook_queue_url is not None:
        # The dispatcher accepts the queue only with the secret (and the task table, in
        # common_env): both come together or not at all.
        webhook_env["SDEKS_WEBHOOK_QUEUE_URL"] = webhook_queue_url
        webhook_secret["SDEKS_WEBHOOK_SECRET"] = (
            config.webhook_secret_name,
            config.webhook_secret_key,
        )
    manifests: list[dict] = [
        k8s.namespace(ns),
        k8s.service_account(name=DISPATCHER_SERVICE_ACCOUNT, namespace=ns),
        k8s.service_account(name=RUNTIME_SERVICE_ACCOUNT, namespace=ns),
        *k8s.dispatcher_rbac(namespace=ns, service_account=DISPATCHER_SERVICE_ACCOUNT),
        k8s.dispatcher_deployment(
            namespace=ns,
            image=dispatcher_image,
            env={
                **common_env,
                **dispatcher_env,
                "SDEKS_DISCOVERY": "kubernetes",
                "SDEKS_KUBERNETES_NAMESPACE": ns,
                "SDEKS_KUBERNETES_SERVICES": json.dumps(services, sort_keys=True),
                "SDEKS_KUBERNETES_PORT_NAME": "http",
                "SDEKS_METRICS_PORT": str(k8s.DISPATCHER_METRICS_PORT),
                "SDEKS_JOB_TIMEOUT_S": str(drain_s),
                "SDEKS_GRACE_PERIOD_S": str(drain_s),
                "SDEKS_RECEIVE_WAIT_S": str(k8s.DISPATCHER_RECEIVE_WAIT_S),
                **webhook_env,
            },
            secret_env=webhook_secret,  # with the internal secrets
            replicas=config.dispatcher_replicas,
            service_account=DISPATCHER_SERVICE_ACCOUNT,
            termination_grace_s=k8s.dispatcher_grace_period_s(
                receive_wait_s=k8s.DISPATCHER_RECEIVE_WAIT_S, drain_s=drain_s
            ),
        ),
        k8s.pod_disruption_budget(
            name=k8s.DISPATCHER,
            namespace=ns,
            labels=k8s.dispatcher_labels(),
            minAvailable=1,
        ),
        k8s.keda_trigger_authentication(namespace=ns),
    ]
    for runtime in config.runtimes:
        name = k8s.runtime_workload_name(runtime.name)
        env = {
            **common_env,
            "SDEKS_RUNTIME": runtime.name,
            "SDEKS_DEFAULT_MODEL": runtime.default_model,
            "SDEKS_MODELS": models_uri,
            "SDEKS_DEVICE": "cuda",
            "SDEKS_CACHE_DIR": "/var/cache/sdeks",
            # Tier budgets sized to the pod, so the cache never outgrows its emptyDir
            # (eviction) or the memory limit (OOM kill).
            "SDEKS_DISK_CACHE_BYTES": str(k8s.MODELS_DISK_CACHE_BYTES),
            "SDEKS_RAM_CACHE_BYTES": str(runtime.memory_bytes - RUNTIME_PROCESS_MEMORY),
            # Read by the runtime once it supports pinning a pool to its default model.
            "SDEKS_DYNAMIC_MODELS": "true" if runtime.dynamic_models else "false",
            "HF_HUB_OFFLINE": "1",
        }
        manifests += [
            k8s.runtime_deployment(
                namespace=ns,
                runtime=runtime.name,
                image=runtime_image,
                env=env,
                models_uri=models_uri,
                instance_types=runtime.instance_types,
                service_account=RUNTIME_SERVICE_ACCOUNT,
                task_time_limit_s=runtime.task_time_limit_s,
                cpu=runtime.cpu,
                memory=runtime.memory,
                secret_env=internal_secrets,
            ),
            k8s.runtime_service(namespace=ns, runtime=runtime.name),
            # One pod at a time may be evicted (node consolidation, upgrades); each
            # evicted pod still drains its running job within its grace period.
            k8s.pod_disruption_budget(
                name=name, namespace=ns, labels=k8s.runtime_labels(runtime.name), maxUnavailable=1
            ),
            k8s.runtime_scaled_object(
                namespace=ns,
                runtime=runtime.name,
                queue_url=queue_urls[runtime.name],
                region=region,
                min_replicas=runtime.min_replicas,
                max_replicas=runtime.max_replicas,
                tasks_per_replica=runtime.tasks_per_replica,
            ),
        ]
    return manifests
