"""The metrics collector: the AWS Distro for OpenTelemetry (ADOT) collector, scraping the
dispatcher's and the pods' Prometheus `/metrics` into CloudWatch (docs/operate.md, "Metrics").

Why ADOT, not the CloudWatch agent: its `awsemf` exporter turns Prometheus counters
into per-minute deltas and gauges into values with the dimensions we choose, so the
alarms can use them as plain CloudWatch metrics; the same collector can export to
Amazon Managed Service for Prometheus by swapping the exporter, with no second agent;
and its scrape configs are Prometheus' own, so the pods' API token is sent with
`authorization.credentials_file`, read from the Secret the pods use.

It runs as one small Deployment in the sdeks namespace (not a DaemonSet: it scrapes
over the network, and the namespace has a handful of targets), discovers pods through
the Kubernetes API (a namespaced Role, read-only) and writes EMF records to a log
group the stack creates, with its own Pod Identity role.

Metric names in CloudWatch are the Prometheus exposition names (`..._total` for
counters); `METRICS` lists those the alarms and dashboards use, with their dimensions.
"""

from __future__ import annotations

from typing import Any

import yaml

from infra import k8s

COLLECTOR = "sdeks-metrics"
#: Where the collector mounts the pod API token (the key of the internal Secret).
TOKEN_DIR = "/etc/sdeks/pod-token"
#: One scrape a minute: a gauge's per-minute Sum is then its value summed over pods.
SCRAPE_INTERVAL_S = 60
HEALTH_PORT = 13133

#: CloudWatch metric -> its dimension sets (each becomes a CloudWatch metric of its own).
METRICS: dict[str, list[list[str]]] = {
    # dispatcher
    "sdeks_dispatcher_pods": [["runtime"]],
    "sdeks_dispatcher_backlog": [["runtime"]],
    "sdeks_dispatcher_leases_held": [["runtime"]],
    "sdeks_dispatcher_jobs_total": [["runtime", "outcome"]],
    "sdeks_dispatcher_failures_total": [["code"], ["component"]],
    "sdeks_dispatcher_errors_total": [["component"]],
    "sdeks_dispatcher_model_switches_total": [["runtime"]],
    "sdeks_dispatcher_pod_retries_total": [["runtime"]],
    # runtime pods (`runtime` comes from the pod's `sdeks.io/runtime` label)
    "sdeks_runtime_jobs_total": [["runtime", "status"]],
    "sdeks_runtime_info": [["runtime"]],
    "sdeks_runtime_busy_slots": [["runtime"]],
    "sdeks_runtime_render_seconds_recent": [["runtime", "quantile"]],
    "sdeks_runtime_phase_seconds": [["runtime", "phase"]],
    # Karpenter: GPUs in use in the GPU NodePool (one GPU per node on the xlarge sizes)
    "karpenter_nodepools_usage": [["nodepool", "resource_type"]],
}


def collector_config(*, namespace: str, metrics_namespace: str, log_group: str) -> dict[str, Any]:
    """The collector's configuration (receivers, processors, exporters, pipeline)."""

    def pods_of(component: str, port_name: str) -> list[dict[str, Any]]:
        # Keep only `component`'s pods and their named metrics port; label what we keep.
        return [
            {
                "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
                "regex": component,
                "action": "keep",
            },
            {
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": port_name,
                "action": "keep",
            },
            {"target_label": "component", "replacement": component},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {
                "source_labels": ["__meta_kubernetes_pod_label_sdeks_io_runtime"],
                "target_label": "runtime",
                "regex": "(.+)",
            },
        ]

    discovery = [{"role": "pod", "namespaces": {"names": [namespace]}}]
    scrape_configs = [
        {
            "job_name": k8s.DISPATCHER,
            "kubernetes_sd_configs": discovery,
            "relabel_configs": pods_of(k8s.DISPATCHER, "metrics"),
        },
        {
            "job_name": "sdeks-runtime",
            # Every pod route but /health wants the token, /metrics included.
            "authorization": {
                "type": "Bearer",
                "credentials_file": f"{TOKEN_DIR}/{k8s.POD_TOKEN_KEY}",
            },
            "kubernetes_sd_configs": discovery,
            "relabel_configs": pods_of("sdeks-runtime", "http"),
        },
        {
            "job_name": "karpenter",
            "static_configs": [{"targets": ["karpenter.kube-system.svc:8080"]}],
            "metric_relabel_configs": [
                {
                    "source_labels": ["__name__"],
                    "regex": "karpenter_nodepools_usage",
                    "action": "keep",
                }
            ],
        },
    ]
    return {
        "extensions": {"health_check": {"endpoint": f"0.0.0.0:{HEALTH_PORT}"}},
        "receivers": {
            "prometheus": {
                "config": {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                        "scrape_timeout": "10s",
                    },
                    "scrape_configs": scrape_configs,
                }
            }
        },
        "processors": {"batch/metrics": {"timeout": "60s"}},
        "exporters": {
            "awsemf": {
                "namespace": metrics_namespace,
                "log_group_name": log_group,
                "log_stream_name": COLLECTOR,
                "dimension_rollup_option": "NoDimensionRollup",
                "resource_to_telemetry_conversion": {"enabled": False},
                "metric_declarations": [
                    {"dimensions": dims, "metric_name_selectors": [f"^{name}$"]}
                    for name, dims in METRICS.items()
                ],
            }
        },
        "service": {
            "extensions": ["health_check"],
            "pipelines": {
                "metrics": {
                    "receivers": ["prometheus"],
                    "processors": ["batch/metrics"],
                    "exporters": ["awsemf"],
                }
            },
        },
    }


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": COLLECTOR, "app.kubernetes.io/part-of": k8s.PART_OF}


def manifests(
    *,
    namespace: str,
    image: str,
    metrics_namespace: str,
    log_group: str,
    region: str,
    internal_secret: str,
) -> list[k8s.Manifest]:
    """ServiceAccount, Role + RoleBinding (read pods), ConfigMap and Deployment."""
    labels = _labels()
    meta = {"namespace": namespace, "labels": dict(labels)}
    config = collector_config(
        namespace=namespace, metrics_namespace=metrics_namespace, log_group=log_group
    )
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": COLLECTOR, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": COLLECTOR, **meta},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": COLLECTOR, **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": COLLECTOR},
            "subjects": [{"kind": "ServiceAccount", "name": COLLECTOR, "namespace": namespace}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": COLLECTOR, **meta},
            "data": {"collector.yaml": yaml.safe_dump(config, sort_keys=False)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": COLLECTOR, **meta},
            "spec": {
                # One replica: two would double every counter delta in CloudWatch.
                "replicas": 1,
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {
                        "serviceAccountName": COLLECTOR,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                        "containers": [
                            {
                                "name": "collector",
                                "image": image,
                                "args": ["--config=/etc/otel/collector.yaml"],
                                "env": [{"name": "AWS_REGION", "value": region}],
                                "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "256Mi"},
                                    "limits": {"memory": "512Mi"},
                                },
                                "readinessProbe": {
                                    "httpGet": {"path": "/", "port": "health"},
                                    "periodSeconds": 10,
                                },
                                "livenessProbe": {
                                    "httpGet": {"path": "/", "port": "health"},
                                    "periodSeconds": 30,
                                },
                                "securityContext": k8s.restricted_security_context(),
                                "volumeMounts": [
                                    {"name": "config", "mountPath": "/etc/otel"},
                                    {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "config", "configMap": {"name": COLLECTOR}},
                            {
                                "name": "token",
                                "secret": {
                                    "secretName": internal_secret,
                                    "items": [
                                        {"key": k8s.POD_TOKEN_KEY, "path": k8s.POD_TOKEN_KEY}
                                    ],
                                },
                            },
                        ],
                    },
                },
            },
        },
    ]
